"""DiffLoRA's training stages as jobs (training/difflora_job.py) on a LoRA dataset that lora_dataset.build trained on
the tiny pure-torch model: the LAE job's file and report, the DiT job's DiffLoRA file (loads and samples), cancel +
resume equal to an uninterrupted run, and clear errors for a dataset that changed under a job and for an LAE of
another layout (real job manager)."""
from __future__ import annotations

import math
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from idlora.training.difflora import DiTTrainer, load_difflora
from idlora.training.difflora_job import DiffLoraTask, LaeTask, population_arrays, population_key
from idlora.training.jobs import JobManager, JobState
from idlora.training.lora_dataset import load_population
from difflora_util import NAMES, build_dataset, dit_cfg, lae_cfg

DIT_STEPS = 20


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("difflora_job")


@pytest.fixture(scope="module")
def dataset(root):
    build_dataset(root / "ds")
    return root / "ds"


@pytest.fixture(scope="module")
def manager(root):
    m = JobManager(root / "jobs", checkpoint_every=2)
    m.register(LaeTask.kind, lambda cfg, d: LaeTask.from_config(cfg, d))
    m.register(DiffLoraTask.kind, lambda cfg, d: DiffLoraTask.from_config(cfg, d))
    yield m
    m.shutdown()


def names(dataset) -> list[str]:
    return population_key(load_population(dataset).entries)


def run_job(manager, task, name: str, timeout: float = 60):
    job = manager.submit(task, name=name)
    manager.wait(job.id, timeout)
    return job


@pytest.fixture(scope="module")
def lae(manager, dataset, root):
    path = root / "lae.safetensors"
    job = run_job(manager, LaeTask(lae_cfg(steps=8), str(dataset), str(path), "lae", names(dataset)), "lae")
    assert job.status.state == JobState.SUCCEEDED, job.status.error
    return {"job": job, "path": path}


def dit_task(dataset, lae_path, out, identities=None, steps=DIT_STEPS):
    return DiffLoraTask(dit_cfg(steps=steps), str(dataset), str(lae_path), str(out), out.name,
                        identities or names(dataset))


@pytest.fixture(scope="module")
def dit_ref(manager, dataset, lae, root):
    out = root / "ref.safetensors"
    job = run_job(manager, dit_task(dataset, lae["path"], out), "ref")
    assert job.status.state == JobState.SUCCEEDED, job.status.error
    return {"job": job, "path": out}


@pytest.fixture
def slow_dit(monkeypatch):
    step = DiTTrainer.train_step

    def slow(trainer):
        time.sleep(0.04)
        return step(trainer)
    monkeypatch.setattr(DiTTrainer, "train_step", slow)


def cancel_at(manager, job, step: int) -> None:
    t = time.time()
    while job.status.step < step:
        assert time.time() - t < 60 and job.status.state in (JobState.QUEUED, JobState.RUNNING), job.status.error
        time.sleep(0.005)
    manager.cancel(job.id)
    manager.wait(job.id, 60)
    assert job.status.state == JobState.CANCELLED, job.status.error


def test_lae_job_writes_the_lae_and_reports_compression_and_errors(lae, dataset):
    result = lae["job"].status.result
    pop, layout, vectors = population_arrays(str(dataset))
    # 1920 numbers (tiny model, attn, rank 2) -> latent (2, 120)
    assert layout.length == 1920 and result["length"] == 1920 and result["latent_shape"] == [2, 120]
    assert result["compression"] == pytest.approx(8.0) and result["steps"] == 8
    assert 0 <= result["relative_error_mean"] <= result["relative_error_max"] and math.isfinite(result["mse"])
    assert result["path"] == str(lae["path"]) and math.isfinite(result["final_loss"])
    model = load_difflora(lae["path"])
    assert model.dit is None and model.layout == layout
    assert model.meta["identities"] == len(NAMES) and model.meta["rank"] == 2 and model.meta["targets"] == "attn"
    x_hat = model.lae(vectors)  # the file holds the trained LAE: same reconstruction error as reported
    rel = ((x_hat - vectors).norm(dim=1) / vectors.norm(dim=1)).mean().item()
    assert rel == pytest.approx(result["relative_error_mean"], rel=1e-4)


def test_dit_job_writes_a_difflora_file_that_loads_and_samples(dit_ref, dataset):
    result = dit_ref["job"].status.result
    assert result["steps"] == DIT_STEPS and result["path"] == str(dit_ref["path"])
    pop, layout, _ = population_arrays(str(dataset))
    model = load_difflora(dit_ref["path"])
    assert model.dit is not None and model.layout == layout and model.latent_scale > 0
    assert model.schedule_cfg == {"steps": 1000, "beta_start": 1e-4, "beta_end": 0.012}
    face, image = torch.stack([f[0] for f in pop.face[:2]]), torch.stack([i[0] for i in pop.image[:2]])
    a = model.sample(face, image, steps=5, seed=1)
    b = model.sample(face, image, steps=5, seed=1)
    assert len(a) == 2 and set(a[0]) == {s.name for s in layout.layers}
    for n, w in a[0].items():
        ref = pop.bundles[pop.names[0]].weights[n]
        assert w.down.shape == ref.down.shape and w.up.shape == ref.up.shape and w.alpha == ref.alpha
        assert torch.isfinite(w.up).all() and torch.equal(w.up, b[0][n].up) and torch.equal(w.down, b[0][n].down)
    bundle = model.bundle(a[0])
    assert bundle.metadata["idlora_method"] == "difflora" and bundle.metadata["ss_network_dim"] == "2"


def test_dit_cancel_then_resume_equals_the_uninterrupted_run(manager, dataset, lae, dit_ref, root, slow_dit):
    out = root / "cut.safetensors"
    job = manager.submit(dit_task(dataset, lae["path"], out), name="cut")
    cancel_at(manager, job, 5)
    assert not out.exists()
    ckpt = torch.load(job.dir / "checkpoint.pt", weights_only=True)
    assert 5 <= ckpt["step"] < DIT_STEPS and ckpt["phase"] == "dit"
    manager.resume(job.id)
    manager.wait(job.id, 60)
    assert job.status.state == JobState.SUCCEEDED and job.status.resumes == 1, job.status.error
    a, b = load_file(str(dit_ref["path"])), load_file(str(out))
    assert a.keys() == b.keys() and any(k.startswith("dit.") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"the resumed DiT differs from the uninterrupted one in {different[:5]}"
    assert job.status.result["steps"] == DIT_STEPS


def test_resume_after_the_dataset_changed_fails_clearly(manager, dataset, lae, root, slow_dit):
    changed = root / "ds_changed"
    shutil.copytree(dataset, changed)
    job = manager.submit(dit_task(changed, lae["path"], root / "changed.safetensors"), name="changed")
    cancel_at(manager, job, 2)
    shutil.rmtree(changed / NAMES[1])
    manager.resume(job.id)
    manager.wait(job.id, 60)
    assert job.status.state == JobState.FAILED
    assert "changed since this job started" in job.status.error and "4 identities then, 3 now" in job.status.error
    assert "start a new job" in job.status.error
    assert not (root / "changed.safetensors").exists()


def test_dit_with_an_lae_of_another_layout_fails_clearly(manager, dataset, root):
    other = root / "ds_rank1"
    build_dataset(other, names=NAMES[:2], rank=1)
    lae1 = root / "lae_rank1.safetensors"
    job = run_job(manager, LaeTask(lae_cfg(steps=2), str(other), str(lae1), "lae1", names(other)), "lae1")
    assert job.status.state == JobState.SUCCEEDED, job.status.error
    assert job.status.result["length"] == 960
    job = run_job(manager, dit_task(dataset, lae1, root / "mixed.safetensors"), "mixed")
    assert job.status.state == JobState.FAILED
    assert "another LoRA layout" in job.status.error and "train an LAE on this dataset first" in job.status.error
    assert not (root / "mixed.safetensors").exists()
