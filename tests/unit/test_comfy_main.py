"""tools/comfy_main.py drops ComfyUI's start-up noise about torchaudio, and nothing else."""
from __future__ import annotations

import logging

from comfy_main import KnownStartupNoise

BLOCK = ["WARNING: some comfy_extras/ nodes did not import correctly. This may be because they are missing some "
         "dependencies.\n", "IMPORT FAILED: nodes_audio.py", "IMPORT FAILED: nodes_audio_encoder.py",
         "\nThis issue might be caused by new missing dependencies added the last time you updated ComfyUI.",
         "Please do a: pip install -r requirements.txt", ""]


def _shown(lines: list[str]) -> list[str]:
    f = KnownStartupNoise()
    out = []
    for line in lines:
        rec = logging.LogRecord("root", logging.WARNING, __file__, 1, line, (), None)
        if f.filter(rec):
            out.append(rec.getMessage())
    return out


def test_the_known_torchaudio_lines_are_dropped():
    noise = ["torchaudio missing, ACE model will be broken", "Traceback (most recent call last):\n  import torchaudio\n"
             "ModuleNotFoundError: No module named 'torchaudio'\n",
             "Cannot import /x/comfy_extras/nodes_audio.py module for custom nodes: No module named 'torchaudio'"]
    assert _shown(["Starting server", *noise, *BLOCK, "To see the GUI go to: http://127.0.0.1:8188"]) == [
        "Starting server", "To see the GUI go to: http://127.0.0.1:8188"]


def test_any_other_import_failure_is_still_shown_with_its_header():
    lines = [*BLOCK[:2], "IMPORT FAILED: nodes_something.py", *BLOCK[2:]]
    shown = _shown(lines)
    assert shown[0] == BLOCK[0] + "\nIMPORT FAILED: nodes_something.py"
    assert shown[1:] == BLOCK[3:]
    assert _shown(["Cannot import x: No module named 'einops'"]) == ["Cannot import x: No module named 'einops'"]
