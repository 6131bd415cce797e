"""Every bundled workflow has the thumbnail ComfyUI's template browser shows (workflows/<name>.jpg), drawn from its
current layout by tools/workflow_thumbnails.py."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

import workflow_thumbnails as thumbs

ROOT = Path(__file__).resolve().parents[2]


def test_every_workflow_has_an_up_to_date_thumbnail():
    names = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
    assert len(names) >= 11
    for n in names:
        with Image.open(ROOT / "workflows" / f"{n}.jpg") as im:
            assert im.size == thumbs.SIZE and im.format == "JPEG"
    assert thumbs.main(["--check"]) == 0, "run: .venv/bin/python tools/workflow_thumbnails.py"
