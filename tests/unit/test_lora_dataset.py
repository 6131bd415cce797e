"""The per-identity LoRA dataset (DiffLoRA Sec. 3.5): hashing, building, skipping, sharding, the resumable job,
the Meta-LoRA trainer and the population check (tiny pure-torch model, real job manager)."""
from __future__ import annotations

import json
import time

import pytest
import torch

from idlora.training.jobs import JobManager, JobState
from idlora.training.lora_dataset import (DatasetConfig, IdentityItem, LoraDatasetTask, build, finished,
                                          identity_hash, load_population, make_trainer, plan, shard)
from idlora.training.lora_format import load_lora
from idlora.training.lora_trainer import LoraTrainer, TrainingInputError, prepare_data
from idlora.training.meta_lora import MetaLoraStage1, save_meta_down
from meta_lora_util import identity_set, stage1_cfg
from tiny_torch import TinyDiffusion, images

STEPS = 4


def _loader(source: dict) -> TinyDiffusion:
    return TinyDiffusion(seed=source["seed"])


def _cfg(**kw) -> DatasetConfig:
    return DatasetConfig(**{"steps": STEPS, "learning_rate": 3e-3, "rank": 2, "targets": "attn", "seed": 3,
                            "resolution": 32, **kw})


def _item(model, name: str, seed: int, k: int = 2, tag: str = "") -> IdentityItem:
    data = prepare_data(model, images(k, seed=seed), "a photo of sks person")
    g = torch.Generator().manual_seed(seed)
    return IdentityItem(name, f"h-{name}-{seed}{tag}", data.latents, data.cond, torch.randn(k - 1, 8, generator=g),
                        torch.randn(k, 6, generator=g))


def _items(model, names="abc"):
    return [_item(model, n, 10 + i) for i, n in enumerate(names)]


def _mtimes(out, names):
    return {n: (out / n / "lora.safetensors").stat().st_mtime_ns for n in names}


def test_identity_hash_follows_images_and_settings(tmp_path):
    files = [tmp_path / "1.png", tmp_path / "2.png"]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 100)
    h = identity_hash(files, _cfg(), "sd15.safetensors")
    assert h == identity_hash(list(reversed(files)), _cfg(), "sd15.safetensors")
    assert h != identity_hash(files, _cfg(steps=5), "sd15.safetensors")
    assert h != identity_hash(files, _cfg(), "other.safetensors")
    assert h != identity_hash(files, _cfg(), "sd15.safetensors", extra="meta-down-sha")
    files[1].write_bytes(bytes([1]) * 99 + b"\x07")
    assert h != identity_hash(files, _cfg(), "sd15.safetensors")


def test_config_errors_name_the_input():
    with pytest.raises(TrainingInputError, match="trainer = 'x'.*use one of"):
        _cfg(trainer="x").validate()
    with pytest.raises(TrainingInputError, match="batch_size = 2.*meta_lora"):
        _cfg(trainer="meta_lora", batch_size=2).validate()
    with pytest.raises(TrainingInputError, match="steps = 0"):
        _cfg(steps=0).validate()
    with pytest.raises(TrainingInputError, match="unknown dataset settings"):
        DatasetConfig.from_dict({"rnak": 2})


def test_build_writes_one_layout_and_a_manifest(tmp_path):
    model, out = TinyDiffusion(seed=0), tmp_path / "ds"
    items = _items(model)
    steps = []
    res = build(model, items, out, _cfg(), on_step=lambda n, s, t, loss: steps.append((n, s, t)))
    assert res == {"dataset": str(out), "identities": 3, "trained": ["a", "b", "c"], "skipped": []}
    assert steps[-1] == ("c", 3 * STEPS, 3 * STEPS) and len(steps) == 3 * STEPS
    pop = load_population(out)
    assert pop.names == ["a", "b", "c"] and len(pop) == 3
    assert {w.rank for b in pop.bundles.values() for w in b.weights.values()} == {2}
    meta = pop.bundles["b"].metadata
    assert (meta["idlora_method"], meta["idlora_identity"], meta["idlora_hash"]) == ("lora_dataset", "b", items[1].hash)
    assert torch.equal(pop.face[1], items[1].face) and torch.equal(pop.image[2], items[2].image)
    entry = json.loads((out / "a" / "entry.json").read_text())
    assert entry["steps"] == STEPS and entry["trainer"] == "lora" and entry["base_model"] == "tiny"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["name"] for e in manifest["identities"]] == ["a", "b", "c"]
    # one shared seed: every identity starts from the same init; the LoRAs differ only by training
    inits = [make_trainer(model, it, _cfg()).network.state_dict() for it in items[:2]]
    assert all(torch.equal(inits[0][k], inits[1][k]) for k in inits[0])
    assert not torch.equal(*(pop.bundles[n].weights[next(iter(pop.layout))].up for n in "ab"))


def test_rerun_skips_finished_and_rebuilds_only_a_changed_identity(tmp_path):
    model, out = TinyDiffusion(seed=0), tmp_path / "ds"
    items = _items(model)
    build(model, items, out, _cfg())
    before = _mtimes(out, "abc")
    steps = []
    res = build(model, items, out, _cfg(), on_step=lambda n, s, t, loss: steps.append(n))
    assert res["trained"] == [] and res["skipped"] == ["a", "b", "c"] and steps == []
    assert _mtimes(out, "abc") == before
    items[1] = _item(model, "b", 99, tag="-new")
    p = plan(out, items)
    assert (p.done, p.todo, p.changed) == (["a", "c"], ["b"], ["b"])
    res = build(model, items, out, _cfg(), on_step=lambda n, s, t, loss: steps.append(n))
    assert res["trained"] == ["b"] and set(steps) == {"b"}
    after = _mtimes(out, "abc")
    assert after["a"] == before["a"] and after["c"] == before["c"] and after["b"] != before["b"]
    assert finished(out, "b", items[1].hash) and load_population(out).entries[1]["hash"] == items[1].hash


def test_two_shards_into_one_folder_cover_everything_once(tmp_path):
    model, out = TinyDiffusion(seed=0), tmp_path / "ds"
    items = _items(model, "edcba")
    parts = [shard(items, i, 2) for i in range(2)]
    names = [[it.name for it in part] for part in parts]
    assert names == [["a", "c", "e"], ["b", "d"]]
    results = [build(model, part, out, _cfg(steps=1)) for part in parts]
    assert [r["trained"] for r in results] == names
    assert load_population(out).names == ["a", "b", "c", "d", "e"]
    assert shard([("x", "h")], 0, 1) == [("x", "h")]
    with pytest.raises(TrainingInputError, match="shard index = 2 is invalid for 2 shards"):
        shard(items, 2, 2)
    with pytest.raises(TrainingInputError, match="shard count = 0"):
        shard(items, 0, 0)


@pytest.fixture
def manager(tmp_path):
    m = JobManager(tmp_path / "jobs", checkpoint_every=2)
    m.register("lora_dataset", lambda cfg, d: LoraDatasetTask.from_config(cfg, d, _loader))
    yield m
    m.shutdown()


def test_job_cancel_in_second_identity_then_resume_equals_uninterrupted(manager, tmp_path, monkeypatch):
    model, steps = TinyDiffusion(seed=0), 6
    items = _items(model, "ab")
    build(model, items, tmp_path / "ref", _cfg(steps=steps))
    step = LoraTrainer.train_step

    def slow(trainer):
        time.sleep(0.04)
        return step(trainer)
    monkeypatch.setattr(LoraTrainer, "train_step", slow)
    out = tmp_path / "ds"
    job = manager.submit(LoraDatasetTask(_cfg(steps=steps), out, items, {"seed": 0}, _loader), name="ds")
    t = time.time()
    while not (job.status.phase == "b" and job.status.step >= steps + 3):
        assert time.time() - t < 60 and job.status.state in (JobState.QUEUED, JobState.RUNNING), job.status.error
        time.sleep(0.005)
    manager.cancel(job.id)
    manager.wait(job.id, 60)
    assert job.status.state == JobState.CANCELLED
    assert finished(out, "a", items[0].hash) and not (out / "b" / "lora.safetensors").exists()
    assert not (out / "b" / "entry.json").exists()
    ckpt = torch.load(job.dir / "checkpoint.pt", weights_only=True)
    assert ckpt["phase"] == "b" and 3 <= ckpt["step"] < steps
    a_mtime = _mtimes(out, "a")
    manager.resume(job.id)
    manager.wait(job.id, 60)
    assert job.status.state == JobState.SUCCEEDED, job.status.error
    assert job.status.result == {"dataset": str(out), "identities": 2, "trained": ["b"], "skipped": ["a"]}
    assert _mtimes(out, "a") == a_mtime and job.status.step == 2 * steps
    ref, got = load_lora(tmp_path / "ref" / "b" / "lora.safetensors"), load_lora(out / "b" / "lora.safetensors")
    for k, w in ref.weights.items():
        assert torch.allclose(w.down, got.weights[k].down, atol=1e-6)
        assert torch.allclose(w.up, got.weights[k].up, atol=1e-6)
    assert json.loads((out / "b" / "entry.json").read_text())["steps"] == steps


def test_meta_lora_trainer_builds_collapsed_loras(tmp_path):
    model = TinyDiffusion(seed=0)
    stage1 = MetaLoraStage1(model, identity_set(model), stage1_cfg(steps=4))
    stage1.run()
    md = tmp_path / "md.safetensors"
    save_meta_down(md, stage1.network, stage1.meta_down_metadata("md"))
    cfg = _cfg(trainer="meta_lora", rank=1, steps=3)
    with pytest.raises(TrainingInputError, match="meta_down_path is empty"):
        build(model, _items(model, "ab"), tmp_path / "ds", cfg)
    res = build(model, _items(model, "ab"), tmp_path / "ds", cfg, meta_down_path=md)
    assert res["trained"] == ["a", "b"]
    pop = load_population(tmp_path / "ds")
    assert {w.rank for b in pop.bundles.values() for w in b.weights.values()} == {1}
    assert pop.bundles["a"].metadata["idlora_trainer"] == "meta_lora"
    assert pop.entries[0]["trainer"] == "meta_lora" and pop.entries[0]["steps"] == 3


def test_population_rejects_a_mixed_layout_and_an_empty_folder(tmp_path):
    model, out = TinyDiffusion(seed=0), tmp_path / "ds"
    with pytest.raises(ValueError, match="no finished identities.*build them"):
        load_population(out)
    build(model, _items(model, "ab"), out, _cfg(steps=1))
    build(model, [_item(model, "c", 5)], out, _cfg(steps=1, rank=4))
    with pytest.raises(ValueError, match="identity 'c' has rank 4 at layer .* where 'a' has rank 2"):
        load_population(out)
