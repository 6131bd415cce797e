"""The examples in docs/API.md, run exactly as written against a real server."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]


def blocks(lang: str) -> list[str]:
    text = (ROOT / "docs" / "API.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def run(srv, lang: str, code: str, timeout: float = 300) -> str:
    cmd = ["bash", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    env = dict(os.environ, COMFY=srv.url, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{lang} example failed ({p.returncode}):\n{code}\n--- stderr:\n{p.stderr[-3000:]}"
    return p.stdout


def test_docs_have_the_examples():
    assert len(blocks("bash")) == 3 and len(blocks("python")) == 3


def test_api_examples_run_as_written(srv):
    queue, routes, _ = blocks("bash")
    follow, events, _ = blocks("python")
    job = run(srv, "bash", queue).strip()
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", job), job
    out = run(srv, "bash", routes)
    answers, pos, dec = [], 0, json.JSONDecoder()
    while pos < len(out.strip()):  # curl prints the answers back to back
        obj, pos = dec.raw_decode(out, pos)
        answers.append(obj)
        while pos < len(out) and out[pos].isspace():
            pos += 1
    assert answers[0]["jobs"][-1]["id"] == job and answers[1]["id"] == job
    assert all("step" in r for r in answers[2]["losses"])
    assert answers[3]["state"] in ("running", "cancelled") and answers[4]["state"] == "queued"
    assert "samples" in answers[5]
    assert run(srv, "python", follow).split() == ["succeeded", "60", "idlora/api_example.safetensors"]
    job2 = run(srv, "bash", queue).strip()
    lines = run(srv, "python", events).splitlines()
    assert lines[-1].split()[:2] == ["api_example_0001", "succeeded"], lines[-3:]  # its own file, not the first's
    assert job2 != job


def test_pipeline_examples_run_as_written(srv):
    """Queue a pipeline with curl and list its files; queue the main pipeline from Python and follow it."""
    _, _, curl = blocks("bash")
    _, _, client = blocks("python")
    lines = run(srv, "bash", curl).split()
    assert lines[0] == "success" and "idlora/idlora_difflora_example.safetensors" in lines
    assert all((srv.base / p).exists() for p in lines if p.startswith("output/"))
    out = run(srv, "python", client, timeout=900).splitlines()
    assert "running IDLoRA DuoLoRA Merge" in out and "job meta_lora_stage1 succeeded" in out
    assert out[-1] == "report idlora/reports/idlora_pipeline_meta_duolora.json"
