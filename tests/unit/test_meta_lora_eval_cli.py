"""tools/meta_lora_eval.py on the tiny SD1.5 checkpoint (ComfyUI in-process in the tool's process) with the dlib scorer,
the bundled identities (workflows/assets/idlora_meta_identities: two people, a photo and its mirror each) and the
random-weight demo CLIP: it fine-tunes both methods on each identity's first photo, generates with ComfyUI's sampler
at every step count, and writes the table with exactly one row per (method, steps); the training photo is not among
the photos R-FaceSim scores against. The tiny checkpoint's random U-Net draws no faces, so R-FaceSim and FaceSim are
reported as not computed (no face), never 0; the numbers themselves are checked in test_meta_lora_eval.py. Bad input
exits with status 2 and names the value."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import server_util

pytestmark = pytest.mark.comfy  # ComfyUI in-process, in the tool's process (no server)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "meta_lora_eval.py"
IDENTITIES = ROOT / "workflows" / "assets" / "idlora_meta_identities"
TIMEOUT = 240


def random_meta_down(ckpt: Path, path: Path, r1: int = 4) -> Path:
    """A seeded random Meta-Down (r1 4) for the checkpoint's attention layers, from the file's header (no model load):
    the loop's plumbing is under test here, not stage 1."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    with safe_open(str(ckpt), "pt") as f:
        for key in f.keys():
            m = re.fullmatch(r"model\.diffusion_model\.(.*attn[12]\.(to_q|to_k|to_v|to_out\.0))\.weight", key)
            if m:
                d_in = f.get_slice(key).get_shape()[1]
                tensors[f"{m.group(1)}.meta_down"] = torch.randn(r1, d_in, generator=g) / d_in ** 0.5
    save_file(tensors, str(path), metadata={"idlora_method": "meta_lora_down", "idlora_r1": str(r1),
                                            "idlora_base_model": "sd15", "idlora_targets": "attn",
                                            "idlora_name": "random"})
    return path


def demo_clip() -> Path:
    d = os.environ.get("IDLORA_DEMO_MODELS")
    if not d or not (Path(d) / "clip").is_dir():
        pytest.fail("IDLORA_DEMO_MODELS is not set to the demo models: run the tests with ./idlora test")
    return Path(d) / "clip" / "idlora_demo_random_clip.safetensors"


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TIMEOUT)
    print(f"meta_lora_eval.py: {time.perf_counter() - t:.1f} s")
    return proc


def test_eval_cli_writes_one_row_per_method_and_steps(tmp_path):
    ckpt = server_util.tiny_ckpt()
    md = random_meta_down(ckpt, tmp_path / "md.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {}, looking at the camera\n")
    out = tmp_path / "out"
    proc = run("--checkpoint", str(ckpt), "--meta-down", str(md), "--data", str(IDENTITIES), "--out", str(out),
               "--steps", "2,1", "--prompts", str(prompts), "--max-images", "2", "--res", "64", "--width", "64",
               "--height", "64", "--sample-steps", "2", "--lr", "1e-3", "--clip-arch", "idlora-demo-tiny-clip",
               "--clip-checkpoint", str(demo_clip()), "--save-images")
    assert proc.returncode == 0, proc.stdout[-6000:]
    summary = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert (summary["rows"], summary["identities"], summary["images_saved"]) == (4, 2, 8)

    rows = list(csv.reader(Path(summary["csv"]).open()))
    assert rows[0] == ["method", "steps", "R-FaceSim", "CLIP-T", "FaceSim", "images", "no_face"]
    assert [tuple(r[:2]) for r in rows[1:]] == [("meta_lora", "1"), ("meta_lora", "2"), ("lora_aug", "1"),
                                               ("lora_aug", "2")]  # exactly one row per (method, steps)
    report = json.loads(Path(summary["json"]).read_text())
    for name in ("astronaut", "biden"):
        ident = report["identities"][name]
        assert ident["reference"] == f"{name}_1.jpg"  # trained on the first photo ...
        assert ident["others"] == ident["others_scored"] == [f"{name}_2_mirrored.jpg"]  # ... scored on the other
        assert ident["crops"] == 2
    for row in report["rows"]:
        assert row["images"] == 2 and row["CLIP-T"]["count"] == 2 and row["CLIP-T"]["mean"] is not None
        for metric in ("R-FaceSim", "FaceSim"):  # the random U-Net draws no face: not computed, never 0
            m = row[metric]
            assert m["mean"] is None and m["no_face"] == 2 and "no face" in m["detail"]["note"], m
    md_text = Path(summary["md"]).read_text()
    assert "| method | steps | R-FaceSim (%) | CLIP-T (%) |" in md_text and "| lora_aug | 2 | n/c |" in md_text
    assert md_text in proc.stdout
    assert len(list((out / "images").glob("*.png"))) == 8


def test_eval_cli_bad_input_exits_2(tmp_path):
    ckpt = server_util.tiny_ckpt()
    md = random_meta_down(ckpt, tmp_path / "md.safetensors")
    proc = run("--checkpoint", str(ckpt), "--meta-down", str(md), "--data", str(IDENTITIES), "--out",
               str(tmp_path / "o"), "--steps", "250,x")
    assert proc.returncode == 2 and "steps entry 'x' is invalid" in proc.stdout, proc.stdout[-3000:]
