"""`./idlora demo` (tools/bootstrap.py demo) as a user runs it: it starts a real server on a fresh base folder,
queues a bundled workflow's API twin over HTTP, prints where the images, LoRAs and reports went (they must exist),
stops the server, and fails with a clear message and the server's last log lines when the workflow is refused."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import server_util

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^\[idlora\] (image|LoRA|report):\s+(\S.*)$", re.M)


def demo(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the demo with the system's stdlib python, as ./idlora does (bootstrap finds the venv itself)."""
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    return subprocess.run([python, str(ROOT / "tools" / "bootstrap.py"), "demo", *args], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)


def port_is_free(port: int) -> bool:
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_demo_runs_the_default_workflow_and_prints_existing_outputs(tmp_path):
    from bootstrap import DEMO_WORKFLOW
    port = server_util.free_port()
    base = tmp_path / "base"
    res = demo("--base-dir", str(base), "--port", str(port))
    assert res.returncode == 0, res.stdout[-6000:]
    assert f"queuing {DEMO_WORKFLOW}" in res.stdout and f"127.0.0.1:{port}" in res.stdout, res.stdout
    found = LINE.findall(res.stdout)
    kinds = {k for k, _ in found}
    assert kinds == {"image", "LoRA", "report"}, res.stdout  # the DiffLoRA sample writes all three
    for kind, path in found:
        p = Path(path)
        assert p.is_file() and p.stat().st_size > 0, f"{kind} {path} is not there:\n{res.stdout}"
        assert base.resolve() in p.resolve().parents or base in p.parents, path
    assert any(p.endswith(".png") for k, p in found if k == "image")
    assert any(p.endswith(".safetensors") for k, p in found if k == "LoRA")
    assert "server stopped" in res.stdout and port_is_free(port), res.stdout
    log = (base / "idlora_demo_server.log").read_text()
    assert "IMPORT FAILED" not in log and "torchaudio" not in log, log[:4000]  # tools/comfy_main.py's filter
    assert "custom_nodes/IDLoRA" in log  # ComfyUI's import-times table: the pack loaded


def test_demo_fails_clearly_on_a_refused_workflow(tmp_path):
    wf = json.loads((ROOT / "workflows" / "api" / "idlora_train_lora.json").read_text())
    wf["1"]["inputs"]["ckpt_name"] = "not_on_the_server.safetensors"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(wf))
    port = server_util.free_port()
    res = demo("--base-dir", str(tmp_path / "base"), "--port", str(port), "--workflow", str(bad))
    assert res.returncode != 0, res.stdout
    assert "demo failed: POST /prompt refused the workflow (400)" in res.stdout, res.stdout
    assert "not_on_the_server.safetensors" in res.stdout, res.stdout
    assert "last lines of the server log" in res.stdout, res.stdout
    assert port_is_free(port), "the server was left running after a failure"


def test_demo_names_the_workflows_when_one_is_unknown():
    res = demo("--workflow", "no_such_workflow", timeout=60)
    assert res.returncode != 0
    assert "no workflow 'no_such_workflow'" in res.stdout and "idlora_difflora_sample" in res.stdout, res.stdout
