#!/usr/bin/env python
"""Run ComfyUI's main.py without the start-up lines about torchaudio, which a user would read as IDLoRA failing.

torchaudio has no build for the pinned torch (see the README), so two of ComfyUI's own node files
(comfy_extras/nodes_audio.py and nodes_audio_encoder.py) cannot import and its audio VAEs warn that they will be
broken. ComfyUI runs fine without them, but prints tracebacks, "IMPORT FAILED" and "Please do a: pip install -r
requirements.txt" at every start. This launcher drops exactly those log records (each mentions torchaudio or one
of those two files); any other import failure is still printed in full, with ComfyUI's header before it.

    python tools/comfy_main.py <ComfyUI folder>/main.py [main.py's arguments]
"""
from __future__ import annotations

import logging
import runpy
import sys
from pathlib import Path

KNOWN_FILES = ("nodes_audio.py", "nodes_audio_encoder.py")
_HEADER = "WARNING: some comfy_extras/ nodes did not import correctly"
_TAIL = ("\nThis issue might be caused by new missing dependencies", "Please do a: pip install",
         "Please run the update script")


class KnownStartupNoise(logging.Filter):
    """Drops the torchaudio records; holds ComfyUI's 'some comfy_extras nodes did not import' block back unless
    a file outside KNOWN_FILES failed, in which case the header is put in front of that file's line."""

    def __init__(self) -> None:
        super().__init__()
        self.header: str | None = None
        self.other_failed = False

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "torchaudio" in msg and ("No module named" in msg or "torchaudio missing" in msg):
            return False
        if msg.startswith(_HEADER):
            self.header, self.other_failed = msg, False
            return False
        if self.header is None:
            return True
        if msg.startswith("IMPORT FAILED: "):
            if msg[len("IMPORT FAILED: "):].strip() in KNOWN_FILES:
                return False
            if not self.other_failed:
                record.msg, record.args, self.other_failed = f"{self.header}\n{msg}", (), True
            return True
        if msg.startswith(_TAIL):
            return self.other_failed
        if not msg.strip():  # the block's last line
            shown, self.header = self.other_failed, None
            return shown
        self.header = None
        return True


def main(argv: list[str]) -> None:
    if not argv or not argv[0].endswith("main.py"):
        raise SystemExit("usage: comfy_main.py <ComfyUI folder>/main.py [arguments of main.py]")
    main_py = Path(argv[0]).resolve()
    logging.getLogger().addFilter(KnownStartupNoise())
    sys.argv = [str(main_py), *argv[1:]]
    sys.path.insert(0, str(main_py.parent))
    runpy.run_path(str(main_py), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
