"""The bundled end-to-end pipelines, queued over POST /prompt on a real server with the tiny checkpoint: each
completes, and its outputs exist with the documented shapes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]


def run(srv, name: str) -> dict:
    wf = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    hist, _ = srv.run(wf, timeout=900)
    assert hist.get("status", {}).get("status_str") == "success", json.dumps(hist.get("status"))[:3000]
    return hist["outputs"]


def image(srv, out: dict, node: str) -> np.ndarray:
    [img] = out[node]["images"]
    return np.asarray(Image.open(srv.base / "output" / img["subfolder"] / img["filename"]))


def lora(srv, name: str):
    from idlora.training.lora_format import load_lora
    return load_lora(srv.base / "models" / "loras" / name)


def test_meta_lora_then_duolora_pipeline(srv):
    out = run(srv, "idlora_pipeline_meta_duolora")
    merged = lora(srv, out["12"]["lora_files"][0])
    assert merged.metadata["idlora_method"] == "merge_duolora" and len(merged.weights) == 8
    assert image(srv, out, "19").shape == (160, 128, 3)
    report = json.loads((srv.base / "output" / out["23"]["idlora_reports"][0]).read_text())
    assert all(m in json.dumps(report) for m in ("FaceSim", "CLIP-T", "CLIP-I (style)"))
    assert image(srv, out, "24").ndim == 3


def test_difflora_then_meta_lora_refinement_pipeline(srv):
    out = run(srv, "idlora_pipeline_difflora_refine")
    sampled, refined = lora(srv, out["8"]["lora_files"][0]), lora(srv, out["10"]["lora_files"][0])
    assert sampled.metadata["idlora_method"] == "difflora" and refined.metadata["idlora_method"] == "meta_lora"
    assert set(sampled.weights) == set(refined.weights) and {w.rank for w in refined.weights.values()} == {1}
    assert "started from init_lora" in out["9"]["text"][0]
    assert image(srv, out, "23").shape == image(srv, out, "33").shape == (160, 128, 3)
    board = image(srv, out, "41")
    assert board.shape[1] >= 2 * 256 and "DiffLoRA + Meta-LoRA refinement" in out["40"]["text"][0]


def test_comparison_board_pipeline(srv):
    out = run(srv, "idlora_pipeline_board")
    rows = out["40"]["text"][0].splitlines()
    assert rows[0].startswith("method") and [r.split("|")[0].strip() for r in rows[1:]] == [
        "plain LoRA", "Meta-LoRA", "DiffLoRA", "stylization content LoRA"]
    board = image(srv, out, "41")
    assert board.shape[1] >= 4 * 256 and board.shape[0] > 256
    for node in ("23", "33", "53", "63"):
        assert image(srv, out, node).shape == (160, 128, 3)
