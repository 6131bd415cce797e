"""Meta-LoRA stage 1 and stage 2 as jobs: a cancel in the middle of a bucket, then resume, gives the same
Meta-Down as an uninterrupted run; stage 2 writes a standard LoRA (tiny pure-torch model, real job manager)."""
from __future__ import annotations

import time

import pytest
import torch

from idlora.training.jobs import JobManager, JobState
from idlora.training.lora_format import load_lora
from idlora.training.meta_lora import MetaStage2Config, load_meta_down
from idlora.training.meta_lora_job import MetaPersonalizeTask, MetaStage1Task
from meta_lora_util import crops as _crops, identity_set, stage1_cfg
from tiny_torch import TinyDiffusion


def _loader(source: dict) -> TinyDiffusion:
    return TinyDiffusion(seed=source["seed"])


class SlowStage1(MetaStage1Task):
    def run(self, ctx):
        from idlora.training import meta_lora
        step = meta_lora.MetaLoraStage1.train_step

        def slow(trainer):
            time.sleep(0.03)
            return step(trainer)
        meta_lora.MetaLoraStage1.train_step = slow
        try:
            return super().run(ctx)
        finally:
            meta_lora.MetaLoraStage1.train_step = step


@pytest.fixture
def manager(tmp_path):
    m = JobManager(tmp_path / "jobs", checkpoint_every=3)
    m.register("meta_lora_stage1", lambda cfg, d: SlowStage1.from_config(cfg, d, _loader))
    m.register("meta_lora_personalize", lambda cfg, d: MetaPersonalizeTask.from_config(cfg, d, _loader))
    yield m
    m.shutdown()


def _stage1(tmp_path, name):
    model = TinyDiffusion(seed=0)
    cfg = stage1_cfg(steps=16, bucket_steps=5)
    return SlowStage1(cfg, str(tmp_path / f"{name}.safetensors"), f"{name}.safetensors", {"seed": 0}, _loader,
                      identity_set(model))


def test_stage1_cancel_inside_a_bucket_then_resume_equals_uninterrupted(manager, tmp_path):
    ref = manager.submit(_stage1(tmp_path, "ref"), name="ref")
    manager.wait(ref.id, 120)
    assert ref.status.state == JobState.SUCCEEDED, ref.status.error
    job = manager.submit(_stage1(tmp_path, "cut"), name="cut")
    t = time.time()
    while job.status.step < 7:
        assert time.time() - t < 60
        time.sleep(0.005)
    manager.cancel(job.id)
    manager.wait(job.id, 60)
    assert job.status.state == JobState.CANCELLED and not (tmp_path / "cut.safetensors").exists()
    ckpt = torch.load(job.dir / "checkpoint.pt", weights_only=True)
    assert ckpt["bucket_index"] >= 1 and 7 <= ckpt["step"] < 16
    manager.resume(job.id)
    manager.wait(job.id, 120)
    assert job.status.state == JobState.SUCCEEDED, job.status.error
    a, _ = load_meta_down(tmp_path / "ref.safetensors")
    b, meta = load_meta_down(tmp_path / "cut.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert meta["idlora_steps"] == "16" and meta["idlora_identities"] == "5"


def test_stage2_job_writes_a_collapsed_lora(manager, tmp_path):
    ref = manager.submit(_stage1(tmp_path, "md"), name="md")
    manager.wait(ref.id, 120)
    model = TinyDiffusion(seed=0)
    out = tmp_path / "person.safetensors"
    task = MetaPersonalizeTask(MetaStage2Config(steps=5, rank=1, learning_rate=1e-2), str(tmp_path / "md.safetensors"),
                               str(out), "idlora/person.safetensors", {"seed": 0}, _loader, _crops(model))
    job = manager.submit(task, name="person")
    manager.wait(job.id, 120)
    assert job.status.state == JobState.SUCCEEDED, job.status.error
    lora = load_lora(out)
    assert {w.down.shape[0] for w in lora.weights.values()} == {1} and lora.metadata["idlora_method"] == "meta_lora"
    assert job.status.result["lora"] == "idlora/person.safetensors"
    # the baseline (method lora_aug) as a job: a plain LoRA on the Meta-Down's layers
    out2 = tmp_path / "person_aug.safetensors"
    task = MetaPersonalizeTask(MetaStage2Config(steps=5, rank=1, learning_rate=1e-2), str(tmp_path / "md.safetensors"),
                               str(out2), "idlora/person_aug.safetensors", {"seed": 0}, _loader, _crops(model),
                               method="lora_aug")
    job = manager.submit(task, name="person_aug")
    manager.wait(job.id, 120)
    assert job.status.state == JobState.SUCCEEDED, job.status.error
    base = load_lora(out2)
    assert base.metadata["idlora_method"] == "lora_aug" and base.weights.keys() == lora.weights.keys()
    assert job.status.result["method"] == "lora_aug"
    rebuilt = MetaPersonalizeTask.from_config(task.config, job.dir, _loader)  # a restart rebuilds it from its config
    assert rebuilt.config["method"] == "lora_aug"
