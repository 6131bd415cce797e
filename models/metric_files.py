"""Where the weights of the paper metrics (FID, CSD, DreamSim, ImageReward) live, and the error when they do not.

IDLoRA never downloads them: each metric has a ComfyUI models sub-folder (``METRIC_FOLDERS``) where the user puts
the published files under their published names. ``find_model_file`` looks a file up in the folders given (the
nodes pass ComfyUI's, the CLI its ``--models-dir``) and raises ``ModelFilesMissing``, naming the file, the folder
and where the file comes from, when no folder has it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

METRIC_FOLDERS = {  # metric -> its folder under ComfyUI's models/
    "FID": "fid",
    "CSD": "csd",
    "DreamSim": "dreamsim",
    "ImageReward": "image_reward",
}


class ModelFilesMissing(FileNotFoundError):
    """A metric's weight file is not in any of the folders searched; the message says what to put where."""


def missing_message(metric: str, files: Sequence[str], dirs: Sequence[str | Path], source: str) -> str:
    folder = METRIC_FOLDERS[metric]
    searched = ", ".join(str(d) for d in dirs) or "no folder"
    names, several = ", ".join(files), len(files) > 1
    return (f"{metric} needs {names} in models/{folder}/ (searched: {searched}): {source}. "
            f"Put the file{'s' if several else ''} there under {'these names' if several else 'this name'}; "
            f"IDLoRA never downloads weights")


def find_model_file(metric: str, name: str, dirs: Sequence[str | Path], source: str) -> Path:
    """``name`` (a file or folder name, or a path) in the first of ``dirs`` that has it."""
    path = Path(name)
    if path.is_absolute() and path.exists():
        return path
    for d in dirs:
        if (Path(d) / name).exists():
            return Path(d) / name
    raise ModelFilesMissing(missing_message(metric, [path.name], dirs, source))


def missing_files(folder: str | Path, names: Sequence[str]) -> list[str]:
    """The entries of ``names`` (files or folders) that ``folder`` lacks."""
    return [n for n in names if not (Path(folder) / n).exists()]
