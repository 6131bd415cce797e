"""Meta-LoRA stage 1 from the command line under real torchrun (2 processes, gloo on the CPU) on the tiny SD1.5
checkpoint: the processes keep one Meta-Down (checked after every step), the Meta-Down file, a resume after an
interruption that ends exactly where the uninterrupted run ends, and bad input."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import server_util
from idlora.training.meta_lora import load_meta_down

pytestmark = pytest.mark.comfy  # ComfyUI in-process, in the torchrun workers (no server)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "meta_lora_stage1.py"
FACES = ROOT / "tests" / "assets" / "faces"
STEPS, R1 = 8, 8
TIMEOUT = 300
TIMES: dict[str, float] = {}


def make_dataset(root: Path) -> Path:
    """4 identities x 2 images: two different crops of one photo each, 64 px."""
    photos = ["obama.jpg", "biden.jpg", "astronaut.jpg", "obama2.jpg"]
    for i, name in enumerate(photos):
        d = root / f"id{i}"
        d.mkdir(parents=True)
        with Image.open(FACES / name) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h) * 4 // 5
            im.crop((0, 0, s, s)).resize((64, 64)).save(d / "top_left.png")
            im.crop((w - s, h - s, w, h)).resize((64, 64)).save(d / "bottom_right.jpg")
    return root


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return [str(SCRIPT), "--checkpoint", str(server_util.tiny_ckpt()), "--data", str(data), "--out", str(out),
            "--res", "64", "--r1", str(R1), "--r2", "1", "--steps", str(STEPS), "--bucket-steps", "4",
            "--batch-size", "1", "--checkpoint-every", "2", "--log-every", "2", "--sync-log", *extra]


def run(cmd: list[str], label: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=TIMEOUT)
    TIMES[label] = time.perf_counter() - t
    print(f"{label}: {TIMES[label]:.1f} s")
    return proc


def torchrun(data: Path, out: Path, *extra: str, label: str) -> subprocess.CompletedProcess:
    # --standalone: a free rendezvous port, so parallel runs on one machine do not collide on 29500
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                *args(data, out, *extra)], label)


def sync_rows(out: Path) -> list[tuple[int, float]]:
    lines = (out / "sync.tsv").read_text().splitlines()
    assert lines[0] == "step\tmax_diff"
    return [(int(s), float(d)) for s, d in (ln.split("\t") for ln in lines[1:])]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("identities"))


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    proc = torchrun(data, out, label="torchrun 2 x 8 steps")
    assert proc.returncode == 0, proc.stdout[-6000:]
    (out / "log.txt").write_text(proc.stdout)
    return out


def test_two_processes_keep_one_meta_down_and_write_it(full_run):
    log = (full_run / "log.txt").read_text()
    assert "[rank 0/2]" in log and "[rank 1/2]" in log and "backend gloo" in log
    assert "s/step" in log
    rows = sync_rows(full_run)
    assert [s for s, _ in rows] == list(range(1, STEPS + 1))
    assert all(d == 0 for _, d in rows), rows  # identical bits on both processes after every step

    weights, meta = load_meta_down(full_run / "meta_down.safetensors")
    assert meta["idlora_r1"] == str(R1) and meta["idlora_base_model"] == "sd15"
    assert meta["idlora_steps"] == str(STEPS) and meta["idlora_identities"] == "4"
    assert weights and all(w.shape[0] == R1 for w in weights.values())

    # each process trained its own identities (i mod 2) and checkpointed them
    states = [torch.load(full_run / f"checkpoint_rank{r}.pt", weights_only=True)["trainer"] for r in (0, 1)]
    assert [(s["rank"], s["world"], s["step"]) for s in states] == [(0, 2, STEPS), (1, 2, STEPS)]
    assert sorted(map(int, states[0]["store"])) == [0, 2] and sorted(map(int, states[1]["store"])) == [1, 3]
    # the Meta-Down learnt outside the warm-up only: buckets of 4 steps with q_warmup = int(0.4 * 4) = 1 leave
    # steps 2-4 and 6-8, so its optimizer took 6 steps, on both processes
    for s in states:
        assert [int(v["step"]) for v in s["optimizer"]["state"].values()] == [6] * len(weights)
    # the saved Meta-Down is what both processes hold
    for s in states:
        held = {k: v for k, v in s["network"].items() if k.startswith("meta_down.")}
        assert sorted(torch.cat([v.flatten() for v in held.values()]).tolist()) == \
            sorted(torch.cat([w.flatten() for w in weights.values()]).tolist())


def test_resume_after_interruption_ends_where_the_uninterrupted_run_ends(data, full_run, tmp_path):
    out = tmp_path / "resumed"
    # stop inside a bucket (bucket 4 steps, stop after 3, not a --checkpoint-every step): the resume must restore
    # the bucket's Mid / Up and their optimizer, not only the Meta-Down
    first = torchrun(data, out, "--stop-after", "3", label="torchrun --stop-after 3")
    assert first.returncode == 0, first.stdout[-6000:]
    assert "stopped after step 3" in first.stdout
    assert not (out / "meta_down.safetensors").exists()
    assert {torch.load(out / f"checkpoint_rank{r}.pt", weights_only=True)["trainer"]["step"] for r in (0, 1)} == {3}

    second = torchrun(data, out, "--resume", label="torchrun --resume to 8")
    assert second.returncode == 0, second.stdout[-6000:]
    assert "resumed at step 3" in second.stdout
    rows = sync_rows(out)
    assert [s for s, _ in rows] == list(range(1, STEPS + 1)) and all(d == 0 for _, d in rows), rows

    resumed, _ = load_meta_down(out / "meta_down.safetensors")
    straight, _ = load_meta_down(full_run / "meta_down.safetensors")
    assert resumed.keys() == straight.keys()
    diff = max(float((resumed[k] - straight[k]).abs().max()) for k in straight)
    assert diff == 0, f"resumed Meta-Down differs from the uninterrupted run by {diff}"


def test_processes_stay_in_sync_when_gradient_clipping_engages(data, tmp_path):
    """Clipping the Meta-Down gradient together with the rank-local Mid / Up gradients would scale the (equal,
    all-reduced) Meta-Down gradient differently on each process; it is clipped on its own."""
    proc = torchrun(data, tmp_path, "--max-grad-norm", "0.01", label="torchrun with clipping")
    assert proc.returncode == 0, proc.stdout[-6000:]
    rows = sync_rows(tmp_path)
    assert all(d == 0 for _, d in rows), rows


def test_bad_input_exits_with_a_clear_message(data, full_run, tmp_path):
    bad = tmp_path / "bad"
    (bad / "alice").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(bad / "alice" / "1.png")
    (bad / "bob").mkdir()
    proc = run([sys.executable, *args(bad, tmp_path / "o1")], "empty identity folder")
    assert proc.returncode == 2 and "identity 'bob'" in proc.stdout and "needs at least one image" in proc.stdout

    # full_run has checkpoints of 2 processes: a 1-process resume is refused, as is a fresh run over them
    proc = run([sys.executable, *args(data, full_run, "--resume")], "resume with another world size")
    assert proc.returncode == 2 and "resume with the same number of processes (torchrun --nproc_per_node 2)" \
        in proc.stdout, proc.stdout[-3000:]
    proc = run([sys.executable, *args(data, full_run)], "fresh run over checkpoints")
    assert proc.returncode == 2 and "pass --resume to continue it" in proc.stdout, proc.stdout[-3000:]


def test_two_processes_keep_one_meta_down_on_the_tiny_flux(data, tmp_path):
    """The Meta-LoRA paper's model family: stage 1 under torchrun on the tiny Flux-dev (its text encoder from --clip,
    as a Flux checkpoint has none), flux_attn targets; both processes hold the same Meta-Down after every step."""
    flux, clip_l = os.environ.get("IDLORA_TINY_FLUX"), os.environ.get("IDLORA_TINY_CLIP_L")
    if not (flux and clip_l):
        pytest.fail("IDLORA_TINY_FLUX / IDLORA_TINY_CLIP_L are not set: run the tests with ./idlora test")
    out = tmp_path / "flux"
    cmd = args(data, out)
    cmd[cmd.index("--checkpoint") + 1] = flux
    cmd[cmd.index("--steps") + 1] = "4"
    cmd += ["--clip", clip_l, "--targets", "flux_attn"]
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cmd],
               "torchrun 2 x 4 steps, tiny Flux")
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "Flux" in proc.stdout or "flux" in proc.stdout
    rows = sync_rows(out)
    assert [s for s, _ in rows] == [1, 2, 3, 4] and all(d == 0 for _, d in rows), rows
    weights, meta = load_meta_down(out / "meta_down.safetensors")
    assert meta["idlora_base_model"] == "flux" and meta["idlora_targets"] == "flux_attn"
    assert len(weights) == 6 and all(w.shape[0] == R1 for w in weights.values())
