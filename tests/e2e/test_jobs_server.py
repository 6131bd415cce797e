"""Background jobs on a real server: events, cancel/resume through the routes, kill -9 and restart,
one job at a time, generation while a job trains, and the routes' errors."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import websocket
from safetensors.torch import load_file

import server_util
from server_util import ended, job_status, wait_for

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
RESUME_TOL = 1e-6  # max abs difference of any LoRA tensor, resumed vs uninterrupted (CPU, fp32, same seed)


SERVER_ENV = {"IDLORA_CHECKPOINT_EVERY": "5"}
start_job = server_util.start_job


def lora_tensors(base: Path, name: str) -> dict:
    return load_file(str(base / "models" / "loras" / "idlora" / f"{name}.safetensors"))


def test_events_cancel_resume_equals_uninterrupted(srv, server_base):
    base = server_base
    events: list[dict] = []
    ws = websocket.create_connection(f"ws://127.0.0.1:{srv.port}/ws?clientId=watcher", timeout=5)
    ws.settimeout(None)

    def listen():
        while True:
            try:
                msg = ws.recv()
            except (websocket.WebSocketException, OSError):
                return
            if not msg:
                return
            if isinstance(msg, str):
                ev = json.loads(msg)
                if ev["type"].startswith("idlora."):
                    events.append(ev)
    threading.Thread(target=listen, daemon=True).start()

    ref = start_job(srv, "ref_run", steps=30)
    wait_for(srv, ref, ended)
    job = start_job(srv, "cut_run", steps=30)
    wait_for(srv, job, lambda s: s["step"] >= 8)
    code, body = srv.request("POST", f"/idlora/jobs/{job}/cancel")
    assert code == 200, body
    st = wait_for(srv, job, ended)
    assert st["state"] == "cancelled" and st["step"] < 30
    assert (Path(st["folder"]) / "checkpoint.pt").exists()
    assert not (base / "models" / "loras" / "idlora" / "cut_run.safetensors").exists()

    code, body = srv.request("POST", f"/idlora/jobs/{job}/resume")
    assert code == 200 and body["state"] == "queued", body
    st = wait_for(srv, job, ended)
    assert st["state"] == "succeeded" and st["resumes"] == 1 and st["step"] == 30, st
    a, b = lora_tensors(base, "ref_run"), lora_tensors(base, "cut_run")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= RESUME_TOL, worst

    ws.close()
    mine = [e["data"] for e in events if e["data"].get("id") == job and e["type"] == "idlora.job"]
    states = [e["state"] for e in mine]
    assert {"queued", "running", "cancelled", "succeeded"} <= set(states)
    steps = [e["step"] for e in mine if e["state"] == "running"]
    assert steps == sorted(steps) or states.count("running") > 1  # rising within each run
    # losses are incremental and complete after the resume
    code, body = srv.get(f"/idlora/jobs/{job}/loss?since_step=20&stride=3")
    assert code == 200 and [r["step"] for r in body["losses"]] == [21, 24, 27, 30]


def test_two_jobs_never_run_at_once(srv):
    a = start_job(srv, "seq_a", steps=15)
    b = start_job(srv, "seq_b", steps=15)
    sa, sb = wait_for(srv, a, ended), wait_for(srv, b, ended)
    assert sa["state"] == sb["state"] == "succeeded"
    assert sa["finished"] <= sb["started"]


def test_generation_completes_while_a_job_trains(srv):
    job = start_job(srv, "busy", steps=200)
    wait_for(srv, job, lambda s: s["state"] == "running")
    wf = json.loads((ROOT / "workflows" / "api" / "idlora_train_lora.json").read_text())
    gen = {k: wf[k] for k in ("1", "6", "7", "8", "9", "10", "11")}
    for n in ("6", "7"):
        gen[n]["inputs"]["clip"] = ["1", 1]
    gen["9"]["inputs"].update(model=["1", 0], steps=2)
    gen["8"]["inputs"].update(width=64, height=64)
    hist, _ = srv.run(gen, timeout=300)
    assert hist["status"]["status_str"] == "success"
    assert job_status(srv, job)["state"] == "running", "the generation finished while the job was still training"
    srv.request("POST", f"/idlora/jobs/{job}/cancel")
    wait_for(srv, job, ended)


def test_route_errors(srv):
    code, body = srv.get("/idlora/jobs/nope")
    assert code == 404 and "no job with id 'nope'" in body["error"]
    code, body = srv.request("POST", "/idlora/jobs/nope/cancel")
    assert code == 404
    job = start_job(srv, "errs", steps=3)
    wait_for(srv, job, ended)
    for q in ("since_step=abc", "stride=0", "since_step=-1"):
        code, body = srv.get(f"/idlora/jobs/{job}/loss?{q}")
        assert code == 400 and body["error"], (q, body)
    code, body = srv.request("POST", f"/idlora/jobs/{job}/cancel")
    assert code == 409 and "only queued or running" in body["error"]
    raw = srv.raw_post(f"/idlora/jobs/{job}/resume", b"{not json")
    assert raw[0] == 400 and "not valid JSON" in json.loads(raw[1])["error"]
    code, body = srv.get("/api/idlora/jobs")
    assert code == 200 and any(j["id"] == job for j in body["jobs"])


def test_kill_9_then_restart_shows_interrupted_and_resumes(tmp_path):
    from conftest import comfy_dir
    base = server_util.make_base(tmp_path / "crash", server_util.tiny_ckpt())
    s1 = server_util.start(base, comfy_dir(), env={"IDLORA_CHECKPOINT_EVERY": "5"})
    job = start_job(s1, "crash", steps=60)
    wait_for(s1, job, lambda s: s["step"] >= 12)
    os.kill(s1.proc.pid, signal.SIGKILL)
    s1.proc.wait(10)
    s2 = server_util.start(base, comfy_dir(), env={"IDLORA_CHECKPOINT_EVERY": "5"})
    try:
        st = job_status(s2, job)
        assert st["state"] == "interrupted" and "stopped" in st["error"]
        assert not (base / "models" / "loras" / "idlora" / "crash.safetensors").exists()
        code, body = s2.request("POST", f"/idlora/jobs/{job}/resume")
        assert code == 200, body
        st = wait_for(s2, job, ended)
        assert st["state"] == "succeeded" and st["step"] == 60, st
        assert (base / "models" / "loras" / "idlora" / "crash.safetensors").exists()
        steps = [r["step"] for r in s2.get(f"/idlora/jobs/{job}/loss")[1]["losses"]]
        assert steps == list(range(1, 61))
    finally:
        s2.stop()


def test_comfy_cancel_stops_the_waiting_not_the_job(srv):
    import threading as th
    job = start_job(srv, "waited", steps=300)
    wait_for(srv, job, lambda s: s["state"] == "running")
    prompt = {"1": {"class_type": "IDLoRAWaitForJob", "inputs": {"job": job}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
    result = {}
    t = th.Thread(target=lambda: result.update(zip(("hist", "events"), srv.run(prompt))))
    t.start()
    time.sleep(3)
    assert srv.request("POST", "/interrupt")[0] == 200
    t.join(60)
    assert result["hist"]["status"]["status_str"] == "error"  # interrupted prompt
    assert "execution_interrupted" in [m[0] for m in result["hist"]["status"]["messages"]]
    assert job_status(srv, job)["state"] == "running"
    srv.request("POST", f"/idlora/jobs/{job}/cancel")
    wait_for(srv, job, ended)
