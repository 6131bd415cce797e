"""Faults on a real server: bad job files at start-up, stale temp files, duplicate job names, a catastrophic
target pattern, a bogus mode, and a corrupt checkpoint recovered through the restart route."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

import server_util
from server_util import ended, job_prompt, job_status, last_error, start_job, wait_for

pytestmark = pytest.mark.server
JOBS = ("user", "idlora", "jobs")


def _seed_bad_files(base: Path) -> dict:
    """What crashes, short writes and kills leave behind, written before the server starts."""
    jobs = base.joinpath(*JOBS)
    jobs.mkdir(parents=True)
    bad = jobs / "20260101-000000-aaaaaa"
    bad.mkdir()
    (bad / "status.json").write_text("[]")
    good = jobs / "20260101-000000-bbbbbb"
    good.mkdir()
    (good / "config.json").write_text(json.dumps({"kind": "lora", "name": "old", "phases": ["train"], "config": {}}))
    (good / "status.json").write_text(json.dumps({"id": good.name, "kind": "lora", "name": "old",
                                                  "state": "succeeded", "phases": ["train"], "step": 2, "total": 2}))
    (good / "loss.tsv").write_text("1\ttrain\t0.5\n2\ttrain\t")  # a short write
    half = jobs / "20260101-000000-cccccc"  # a submit that failed: config.json only
    half.mkdir()
    (half / "config.json").write_text("{}")
    loras = base / "models" / "loras" / "idlora"
    loras.mkdir(parents=True)
    temps = [good / ".status.json.0123456789ab.tmp", loras / ".x.safetensors.0123456789ab.tmp"]
    for t in temps:
        t.write_bytes(b"half")
    past = time.time() - 3600
    os.utime(temps[1], (past, past))
    return {"bad": bad, "good": good, "half": half, "temps": temps}


@pytest.fixture(scope="module")
def seeded(server_base):
    return _seed_bad_files(server_base)


@pytest.fixture(scope="module")
def srv(seeded, server_base):
    from conftest import comfy_dir
    s = server_util.start(server_base, comfy_dir(), env={"IDLORA_CHECKPOINT_EVERY": "5"})
    yield s
    s.stop()


def test_bad_job_files_do_not_stop_the_pack(srv, seeded):
    code, info = srv.get("/object_info/IDLoRATrainLoRA")
    assert code == 200 and "IDLoRATrainLoRA" in info
    code, body = srv.get("/idlora/jobs")
    assert code == 200
    assert [j["id"] for j in body["jobs"]] == [seeded["good"].name]
    assert [u["folder"] for u in body["unreadable"]] == [str(seeded["bad"])]
    losses = srv.get(f"/idlora/jobs/{seeded['good'].name}/loss")[1]["losses"]
    assert [r["step"] for r in losses] == [1]
    assert not seeded["half"].exists()
    assert not any(t.exists() for t in seeded["temps"])
    assert not [ln for ln in srv.log.read_text().splitlines() if "IMPORT FAILED" in ln and "IDLoRA" in ln]


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_a_second_job_of_the_same_name_never_replaces_the_first_file(srv):
    first = start_job(srv, "dup", steps=3, seed=1)
    a = wait_for(srv, first, ended)
    digest = _sha(a["result"]["path"])
    second = start_job(srv, "dup", steps=3, seed=2)
    b = wait_for(srv, second, ended)
    assert a["state"] == b["state"] == "succeeded"
    assert a["result"]["lora"] == "idlora/dup.safetensors" and b["result"]["lora"] == "idlora/dup_0001.safetensors"
    assert b["name"] == "dup_0001"
    assert _sha(a["result"]["path"]) == digest != _sha(b["result"]["path"])
    assert job_status(srv, first)["result"]["path"] == a["result"]["path"]
    wait = {"1": {"class_type": "IDLoRAWaitForJob", "inputs": {"job": first}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
    hist, _ = srv.run(wait)
    assert hist["status"]["status_str"] == "success"
    assert "idlora/dup.safetensors" in json.dumps(hist["outputs"]["2"])


def test_a_catastrophic_target_pattern_never_freezes_the_server(srv):
    prompt = job_prompt("regex", steps=3)
    prompt["3"]["inputs"].update(mode="blocking", target_pattern="(.+)+!")
    result = {}
    t = threading.Thread(target=lambda: result.update(zip(("hist", "events"), srv.run(prompt, timeout=120))))
    t.start()
    worst = 0.0
    while t.is_alive():
        t0 = time.perf_counter()
        assert srv.request("GET", "/system_stats", timeout=1)[0] == 200
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.1)
    t.join()
    assert worst < 1.0
    assert result["hist"]["status"]["status_str"] == "error"
    msg = last_error(result["events"])["exception_message"]
    assert "(.+)+!" in msg and "matched none" in msg, msg
    prompt["3"]["inputs"]["target_pattern"] = "(?=attn)to_k"
    hist, events = srv.run(prompt, timeout=120)
    assert "RE2" in last_error(events)["exception_message"]


def test_a_bogus_mode_is_refused_and_starts_no_job(srv):
    before = len(srv.get("/idlora/jobs")[1]["jobs"])
    prompt = job_prompt("bogus", steps=3)
    prompt["3"]["inputs"]["mode"] = "bogus"
    code, body = srv.queue(prompt)
    if code == 200:  # refused when the node runs
        entry = None
        for _ in range(600):
            entry = srv.get(f"/history/{body['prompt_id']}")[1].get(body["prompt_id"])
            if entry and entry.get("status", {}).get("completed") is not None:
                break
            time.sleep(0.1)
        assert entry["status"]["status_str"] == "error"
        text = json.dumps(entry["status"]["messages"])
    else:  # refused by the graph validation
        text = json.dumps(body)
    assert "bogus" in text and "background" in text, text
    assert len(srv.get("/idlora/jobs")[1]["jobs"]) == before


def test_a_corrupt_checkpoint_is_reported_and_the_job_restarts_from_step_0(srv):
    job = start_job(srv, "corrupt", steps=30)
    wait_for(srv, job, lambda s: s["step"] >= 12)
    assert srv.request("POST", f"/idlora/jobs/{job}/cancel")[0] == 200
    st = wait_for(srv, job, ended)
    folder = Path(st["folder"])
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (folder / name).write_bytes(b"\x80\x02 not a checkpoint")
    assert srv.request("POST", f"/idlora/jobs/{job}/resume")[0] == 200
    st = wait_for(srv, job, ended)
    assert st["state"] == "failed" and "no readable checkpoint" in st["error"], st
    assert "weights_only" not in st["error"] and f"/idlora/jobs/{job}/restart" in st["error"]
    code, body = srv.request("POST", f"/idlora/jobs/{job}/restart")
    assert code == 200 and body["state"] == "queued" and body["step"] == 0, body
    st = wait_for(srv, job, ended)
    assert st["state"] == "succeeded" and st["step"] == 30, st
    steps = [r["step"] for r in srv.get(f"/idlora/jobs/{job}/loss")[1]["losses"]]
    assert steps == list(range(1, 31))
