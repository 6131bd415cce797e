"""A real ComfyUI server (main.py --cpu) for tests, and a small HTTP + websocket client."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import websocket

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    base: Path
    port: int
    proc: subprocess.Popen
    log: Path
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- HTTP ------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def raw_post(self, path: str, data: bytes) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path: str):
        return self.request("GET", path)

    def alive(self) -> bool:
        try:
            return self.get("/system_stats")[0] == 200
        except OSError:
            return False

    # -- prompts -----------------------------------------------------------
    def queue(self, prompt: dict) -> tuple[int, dict]:
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})

    def run(self, prompt: dict, timeout: float = 900) -> tuple[dict, list[dict]]:
        """Queue a prompt, follow the websocket until it finishes; return (history entry, events)."""
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=timeout)
        try:
            status, body = self.queue(prompt)
            assert status == 200, f"POST /prompt failed ({status}): {json.dumps(body)[:2000]}"
            pid = body["prompt_id"]
            events = []
            deadline = time.time() + timeout
            while time.time() < deadline:
                msg = ws.recv()
                if not isinstance(msg, str):
                    continue  # binary preview frames
                ev = json.loads(msg)
                events.append(ev)
                d = ev.get("data", {})
                if d.get("prompt_id") not in (None, pid):
                    continue
                if ev["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    break
                if ev["type"] == "executing" and d.get("node") is None and d.get("prompt_id") == pid:
                    break
            else:
                raise TimeoutError(f"prompt {pid} did not finish in {timeout} s; server log: {self.log}")
        finally:
            ws.close()
        for _ in range(300):  # the history entry is written just after the last event
            entry = self.get(f"/history/{pid}")[1].get(pid, {})
            if entry.get("status", {}).get("completed") is not None:
                break
            time.sleep(0.1)
        return entry, events

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def job_prompt(name: str, steps: int = 40, seed: int = 0) -> dict:
    """The bundled train-LoRA workflow cut to its training node in background mode (plus an output node)."""
    wf = json.loads((ROOT / "workflows" / "api" / "idlora_train_lora.json").read_text())
    wf = {k: wf[k] for k in ("1", "2", "3")}
    wf["3"]["inputs"].update(mode="background", job_name=name, steps=steps, seed=seed)
    wf["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}}
    return wf


def start_job(srv: "Server", name: str, **kw) -> str:
    """Queue a background training job through the workflow; return its job id."""
    hist, _ = srv.run(job_prompt(name, **kw))
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:2000]
    return hist["outputs"]["3"]["idlora_job"][0]


def job_status(srv: "Server", job_id: str) -> dict:
    """GET /idlora/jobs/{id} (fails the test on anything but 200)."""
    code, body = srv.get(f"/idlora/jobs/{job_id}")
    assert code == 200, body
    return body


def wait_for(srv: "Server", job_id: str, cond, timeout: float = 300, poll: float = 0.05) -> dict:
    """Poll a job's status until ``cond(status)``; TimeoutError with the last status otherwise."""
    t = time.time()
    while time.time() - t < timeout:
        st = job_status(srv, job_id)
        if cond(st):
            return st
        time.sleep(poll)
    raise TimeoutError(f"job {job_id}: {job_status(srv, job_id)}")


def ended(st: dict) -> bool:
    return st["state"] in ("succeeded", "failed", "cancelled", "interrupted")

def tiny_ckpt() -> Path:
    """The tiny SD1.5 checkpoint `./idlora test` generated (its path comes in IDLORA_TINY_CKPT)."""
    import pytest
    p = os.environ.get("IDLORA_TINY_CKPT")
    if not p or not Path(p).exists():
        pytest.fail("IDLORA_TINY_CKPT is not set to the tiny checkpoint: run the tests with ./idlora test")
    return Path(p)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base(base: Path, tiny_ckpt: Path) -> Path:
    for sub in ("models/checkpoints", "models/loras", "input", "output", "user", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "IDLoRA").symlink_to(ROOT, target_is_directory=True)
    (base / "models" / "checkpoints" / "idlora_tiny_sd15.safetensors").symlink_to(tiny_ckpt)
    from comfy_tiny import link_tiny_model_files  # the tiny Flux, SD3 and CLIP-L, as `./idlora start` has them
    link_tiny_model_files(base / "models")
    demo = os.environ.get("IDLORA_DEMO_MODELS")
    if demo and Path(demo).is_dir():  # random-weight face / CLIP stand-ins (tools/demo_models.py)
        from bootstrap import link_demo_models  # tools/
        link_demo_models(base, Path(demo))
    from bootstrap import copy_assets  # tools/
    copy_assets(base / "input")
    settings = base / "user" / "default" / "comfy.settings.json"  # no first-run template dialog in the browser
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    return base


def start(base: Path, comfy_dir: Path, timeout: float = 120, extra_args: list[str] = (),
          env: dict | None = None) -> Server:
    port = free_port()
    log = base / "server.log"
    cmd = [sys.executable, str(comfy_dir / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--disable-auto-launch", "--disable-api-nodes",
           "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}", *extra_args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=base)
    srv = Server(base, port, proc, log)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if srv.alive():
            return srv
        time.sleep(0.5)
    srv.stop()
    raise TimeoutError(f"ComfyUI did not answer in {timeout} s:\n{log.read_text()[-4000:]}")


def last_error(events: list[dict]) -> dict:
    """The data of the last ``execution_error`` websocket event of a run (fails the test when there is none)."""
    errors = [e["data"] for e in events if e["type"] == "execution_error"]
    assert errors, "expected an execution error"
    return errors[-1]
