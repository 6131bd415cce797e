#!/usr/bin/env python
"""Pipeline benchmark: the wall time of each bundled workflow on the CPU with the tiny checkpoint, by stage.

    python benchmarks/bench_pipelines.py [--workflows idlora_pipeline_meta_duolora,...] [--out PATH]

One real ComfyUI server (main.py --cpu, the embedded defaults of `./idlora start`: the tiny random SD1.5
checkpoint and the random-weight demo face / CLIP / DiffLoRA models) in a fresh base folder, so nothing is cached
from an earlier run. Each workflow's API twin (workflows/api/) is queued over POST /prompt with a client id, and
the websocket is followed: an `executing` event starts a node and the next one ends it, timed on this side with
time.perf_counter() as the events arrive. A stage is a node, named by its `_meta.title`; a node that waits for a
background job (IDLoRA Wait for Job, or a training node that waits for the job linked into it) carries the job's
time. Each workflow runs once, in the order given, on the same server: a later workflow may reuse what an earlier
one left (a LoRA file, a loaded checkpoint), as it would for a user. Numbers are the tiny model's: they show where the time
of a pipeline goes, not what a real model costs.

Results are printed as Markdown and written to benchmarks/results/bench_pipelines.md (`--out ''` skips).
Exit status 1 when a workflow failed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "tools", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

DEFAULT = ["idlora_pipeline_meta_duolora", "idlora_pipeline_difflora_refine", "idlora_identity_style",
           "idlora_pipeline_board"]


def run_timed(srv, prompt: dict, timeout: float = 1800) -> tuple[dict, list[tuple[str, float]], float]:
    """Queue ``prompt`` and follow the websocket: (history entry, [(node id, seconds)] in execution order,
    total seconds from the POST to the end)."""
    import websocket
    ws = websocket.create_connection(f"ws://127.0.0.1:{srv.port}/ws?clientId={srv.client_id}", timeout=timeout)
    try:
        t0 = time.perf_counter()
        status, body = srv.queue(prompt)
        if status != 200:
            raise RuntimeError(f"POST /prompt failed ({status}): {json.dumps(body)[:2000]}")
        pid, order, current, started = body["prompt_id"], [], None, t0
        while True:
            msg = ws.recv()
            if not isinstance(msg, str):
                continue
            ev, now = json.loads(msg), time.perf_counter()
            d = ev.get("data", {})
            if d.get("prompt_id") not in (None, pid):
                continue
            if ev["type"] == "executing":
                if current is not None:
                    order.append((current, now - started))
                current, started = d.get("node"), now
                if current is None:
                    break
            elif ev["type"] in ("execution_error", "execution_interrupted"):
                break
        total = time.perf_counter() - t0
    finally:
        ws.close()
    for _ in range(300):
        entry = srv.get(f"/history/{pid}")[1].get(pid, {})
        if entry.get("status", {}).get("completed") is not None:
            return entry, order, total
        time.sleep(0.1)
    raise TimeoutError(f"no history for prompt {pid}")


def table(name: str, wf: dict, order: list[tuple[str, float]], total: float) -> list[str]:
    rows = [f"### {name}", "", f"total **{total:.1f} s** (POST to the end of the last node)", "",
            "| stage (node title) | node type | s | share |", "|---|---|---|---|"]
    for nid, sec in sorted(order, key=lambda x: -x[1]):
        node = wf.get(str(nid), {})
        title = node.get("_meta", {}).get("title", node.get("class_type", str(nid)))
        rows.append(f"| {title} | {node.get('class_type', '?')} | {sec:.2f} | {100 * sec / total:.0f}% |")
    return rows + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--workflows", default=",".join(DEFAULT), help="comma-separated API twin names")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_pipelines.md"))
    a = ap.parse_args(argv)
    import bootstrap
    from server_util import make_base, start

    lines = ["# Pipeline benchmark", "", f"- date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- command: python benchmarks/bench_pipelines.py {' '.join(argv or sys.argv[1:])}",
             f"- python {platform.python_version()}, CPU only (main.py --cpu), the tiny random SD1.5 checkpoint", ""]
    failed = []
    os.environ.setdefault("IDLORA_DEMO_MODELS", str(bootstrap.ensure_demo_models()))
    with tempfile.TemporaryDirectory(prefix="idlora_bench_pipelines_") as tmp:
        base = make_base(Path(tmp), bootstrap.ensure_tiny_checkpoint())
        srv = start(base, bootstrap.comfy_dir())
        try:
            for name in a.workflows.split(","):
                wf = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
                entry, order, total = run_timed(srv, {k: {kk: vv for kk, vv in v.items() if kk != "_meta"}
                                                      for k, v in wf.items()})
                ok = entry.get("status", {}).get("status_str") == "success"
                print(f"{name}: {'ok' if ok else 'FAILED'} in {total:.1f} s", flush=True)
                if not ok:
                    failed.append(name)
                    lines += [f"### {name}", "", f"FAILED: {json.dumps(entry.get('status'))[:1500]}", ""]
                    continue
                lines += table(name, wf, order, total)
        finally:
            srv.stop()
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
        print(f"written: {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
