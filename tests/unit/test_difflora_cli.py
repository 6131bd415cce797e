"""tools/difflora_train.py under real torchrun (2 CPU processes, gloo) on a LoRA dataset built on the tiny pure-torch
model: the LAE and the DiT stay in sync on both processes (checked after every step), their files load (the DiffLoRA
file samples), --resume after --stop-after ends with the weights of the uninterrupted run, and bad input exits with
status 2 and a message saying what to fix."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import difflora_train  # tools/
from difflora_util import NAMES, build_dataset, lae_cfg
from idlora.training.difflora import LaeTrainer, load_difflora, save_difflora
from idlora.training.difflora_job import population_arrays

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "difflora_train.py"
TIMEOUT = 120
LAE_STEPS, DIT_STEPS = 6, 8
LAE_FLAGS = ["--patch", "8", "--levels", "2", "--channels", "16", "--latent-channels", "2", "--heads", "2",
             "--mlp-hidden", "16", "--batch-size", "2", "--lr", "3e-3"]
DIT_FLAGS = ["--hidden", "16", "--depth", "1", "--heads", "2", "--batch-size", "4", "--lr", "1e-3"]


def run(cmd: list[str], label: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=TIMEOUT)
    print(f"{label}: {time.perf_counter() - t:.1f} s")
    return proc


def torchrun(*args: str, label: str) -> subprocess.CompletedProcess:
    # --standalone: a free rendezvous port, so parallel runs on one machine do not collide on 29500
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
                *args], label)


def lae_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["lae", "--dataset", str(dataset), "--out", str(out), "--steps", str(LAE_STEPS), *LAE_FLAGS,
            "--checkpoint-every", "2", "--log-every", "2", "--sync-log", *extra]


def dit_args(dataset: Path, lae: Path, out: Path, *extra: str) -> list[str]:
    return ["dit", "--dataset", str(dataset), "--lae", str(lae), "--out", str(out), "--steps", str(DIT_STEPS),
            *DIT_FLAGS, "--checkpoint-every", "2", "--log-every", "2", "--sync-log", *extra]


def summary(proc: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout[-4000:]  # process 0 prints it, once
    return json.loads(lines[0])


def sync_rows(path: Path) -> list[tuple[int, float]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "step\tmax_diff"
    return [(int(s), float(d)) for s, d in (ln.split("\t") for ln in lines[1:])]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("difflora_cli")


@pytest.fixture(scope="module")
def dataset(root):
    build_dataset(root / "ds")
    return root / "ds"


@pytest.fixture(scope="module")
def lae_run(root, dataset):
    out = root / "lae" / "lae.safetensors"
    proc = torchrun(*lae_args(dataset, out), label="torchrun lae 2 x 6 steps")
    assert proc.returncode == 0, proc.stdout[-6000:]
    return {"proc": proc, "out": out}


@pytest.fixture(scope="module")
def dit_run(root, dataset, lae_run):
    out = root / "dit" / "difflora.safetensors"
    proc = torchrun(*dit_args(dataset, lae_run["out"], out), label="torchrun dit 2 x 8 steps")
    assert proc.returncode == 0, proc.stdout[-6000:]
    return {"proc": proc, "out": out}


def test_lae_on_two_processes_stays_in_sync_and_writes_the_lae(lae_run, dataset):
    proc, out = lae_run["proc"], lae_run["out"]
    assert "[rank 0/2]" in proc.stdout and "[rank 1/2]" in proc.stdout and "backend gloo" in proc.stdout
    rows = sync_rows(out.parent / "lae.sync.tsv")
    assert [s for s, _ in rows] == list(range(1, LAE_STEPS + 1)) and all(d == 0 for _, d in rows), rows
    result = summary(proc)
    assert result["stage"] == "lae" and result["steps"] == LAE_STEPS and result["identities"] == len(NAMES)
    assert result["compression"] == pytest.approx(8.0) and result["latent_shape"] == [2, 120]
    assert 0 <= result["relative_error_mean"] <= result["relative_error_max"]
    model = load_difflora(out)
    _, layout, _ = population_arrays(str(dataset))
    assert model.dit is None and model.layout == layout and model.meta["identities"] == len(NAMES)
    states = [torch.load(out.parent / f"lae.ckpt_rank{r}.pt", weights_only=True)["trainer"] for r in (0, 1)]
    assert [(s["rank"], s["world"], s["step"]) for s in states] == [(0, 2, LAE_STEPS), (1, 2, LAE_STEPS)]
    saved = load_file(str(out))
    for s in states:  # both processes hold the weights that were saved, bit for bit
        assert all(torch.equal(v, saved[f"lae.{k}"]) for k, v in s["module"].items())


def test_dit_on_two_processes_stays_in_sync_and_writes_a_difflora_file(dit_run, dataset):
    proc, out = dit_run["proc"], dit_run["out"]
    rows = sync_rows(out.parent / "difflora.sync.tsv")
    assert [s for s, _ in rows] == list(range(1, DIT_STEPS + 1)) and all(d == 0 for _, d in rows), rows
    assert summary(proc)["steps"] == DIT_STEPS and "s/step" in proc.stdout
    model = load_difflora(out)
    pop, layout, _ = population_arrays(str(dataset))
    assert model.dit is not None and model.layout == layout
    loras = model.sample(pop.face[0][:1], pop.image[0][:1], steps=4, seed=0)
    assert len(loras) == 1 and set(loras[0]) == {s.name for s in layout.layers}
    states = [torch.load(out.parent / f"difflora.ckpt_rank{r}.pt", weights_only=True)["trainer"] for r in (0, 1)]
    assert [s["step"] for s in states] == [DIT_STEPS] * 2
    assert all(torch.equal(states[0]["module"][k], states[1]["module"][k]) for k in states[0]["module"])


def test_resume_after_stop_ends_with_the_uninterrupted_weights(root, dataset, lae_run, dit_run):
    out = root / "resumed" / "difflora.safetensors"
    first = torchrun(*dit_args(dataset, lae_run["out"], out, "--stop-after", "3"), label="torchrun dit --stop-after 3")
    assert first.returncode == 0, first.stdout[-6000:]
    assert "stopped after step 3" in first.stdout and not out.exists()
    assert {torch.load(out.parent / f"difflora.ckpt_rank{r}.pt", weights_only=True)["trainer"]["step"]
            for r in (0, 1)} == {3}
    second = torchrun(*dit_args(dataset, lae_run["out"], out, "--resume"), label="torchrun dit --resume to 8")
    assert second.returncode == 0, second.stdout[-6000:]
    assert "resumed at step 3" in second.stdout
    rows = sync_rows(out.parent / "difflora.sync.tsv")
    assert [s for s, _ in rows] == list(range(1, DIT_STEPS + 1)) and all(d == 0 for _, d in rows), rows
    a, b = load_file(str(dit_run["out"])), load_file(str(out))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"the resumed DiffLoRA differs from the uninterrupted run in {different[:5]}"


def test_bad_dataset_path_exits_2_with_a_message(root):
    proc = run([sys.executable, str(SCRIPT), "lae", "--dataset", str(root / "nowhere"), "--out",
                str(root / "x.safetensors")], "bad dataset path")
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "--dataset" in proc.stdout and "does not exist" in proc.stdout
    assert "tools/build_lora_dataset.py" in proc.stdout and "Traceback" not in proc.stdout


def _train(argv: list[str]) -> int:
    return difflora_train.train(difflora_train.parse_args(argv), 0, 1, torch.device("cpu"), "none")


def test_bad_input_names_what_to_fix(root, dataset, lae_run, dit_run):
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match="no finished identities"):
        _train(["lae", "--dataset", str(root / "empty"), "--out", str(root / "e.safetensors")])
    with pytest.raises(ValueError, match="does not end in .safetensors"):
        _train(["lae", "--dataset", str(dataset), "--out", str(root / "lae.pt")])
    with pytest.raises(ValueError, match="--lae .* is not a file: train the LAE first"):
        _train(["dit", "--dataset", str(dataset), "--lae", str(root / "none.safetensors"), "--out",
                str(root / "d.safetensors")])
    with pytest.raises(ValueError, match="is the --lae file"):
        _train(dit_args(dataset, lae_run["out"], lae_run["out"]))
    with pytest.raises(ValueError, match="channels = 12 must be a multiple of 8"):
        _train(["lae", "--dataset", str(dataset), "--out", str(root / "c.safetensors"), "--channels", "12"])

    # an LAE trained on LoRAs of another rank
    other = root / "ds_rank1"
    build_dataset(other, names=NAMES[:2], rank=1)
    _, layout, vectors = population_arrays(str(other))
    lae1 = save_difflora(root / "lae_rank1.safetensors", layout, LaeTrainer(vectors, lae_cfg(steps=1)).module)
    with pytest.raises(ValueError, match=r"another LoRA layout \(16 layers, 960 numbers\).*train an LAE on this"):
        _train(dit_args(dataset, Path(lae1), root / "mixed.safetensors"))
    assert not (root / "mixed.safetensors").exists()

    # the checkpoints of the 2-process run: a 1-process resume, a fresh run over them, other settings
    dit_out = dit_run["out"]
    with pytest.raises(ValueError, match=r"resume with the same number of processes \(torchrun --nproc_per_node 2\)"):
        _train(dit_args(dataset, lae_run["out"], dit_out, "--resume"))
    with pytest.raises(ValueError, match="pass --resume to continue it"):
        _train(dit_args(dataset, lae_run["out"], dit_out))
    with pytest.raises(ValueError, match="no difflora.ckpt_rank.*start without --resume"):
        _train(dit_args(dataset, lae_run["out"], root / "fresh" / "difflora.safetensors", "--resume"))
    single = root / "single" / "lae.safetensors"
    assert _train(lae_args(dataset, single, "--stop-after", "2")) == 0
    with pytest.raises(ValueError, match=r"other settings or data \(settings: .*'learning_rate': 0.003"):
        _train(lae_args(dataset, single, "--resume", "--lr", "1e-2"))
    assert _train(lae_args(dataset, single, "--resume")) == 0 and single.exists()
