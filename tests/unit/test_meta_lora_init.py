"""Meta-LoRA stage 2 started from a given LoRA: the start is that LoRA when its downs lie in the Meta-Down's row
space and its projection otherwise; mismatched LoRAs are refused by name; training from it changes Mid / Up only;
a background job keeps the init in its data.pt across a cancel and a resume (tiny pure-torch model)."""
from __future__ import annotations

import time

import pytest
import torch

from idlora.models.lora import select_targets
from idlora.models.meta_lora import MetaLoraNetwork
from idlora.training.jobs import JobManager, JobState
from idlora.training.lora_format import LoraBundle, LoraWeight, load_lora
from idlora.training.lora_trainer import TrainingInputError
from idlora.training.meta_lora import MetaLoraPersonalizer, MetaStage2Config, save_meta_down
from idlora.training.meta_lora_job import MetaPersonalizeTask
from meta_lora_util import crops as _crops
from tiny_torch import TinyDiffusion

R1, R2 = 8, 2


def _meta_down(model, tmp_path=None):
    """A random Meta-Down on the 'attn' targets (no stage 1 needed): (weights, meta[, path])."""
    net = MetaLoraNetwork(select_targets(model.denoiser, "attn"), R1, R2, seed=3)
    meta = {"idlora_base_model": "tiny", "idlora_targets": "attn", "idlora_name": "md"}
    weights = {n: net.meta_down[k].detach().clone() for n, k in zip(net.names, net.meta_down.keys())}
    path = None
    if tmp_path is not None:
        path = tmp_path / "md.safetensors"
        save_meta_down(path, net, meta)
    return weights, dict(meta, idlora_r1=str(R1)), path


def _lora(model, weights, in_row_space: bool, rank=R2, alpha=4.0, seed=0) -> LoraBundle:
    """Random rank-``rank`` LoRA on the Meta-Down's layers, its downs in the row space of the Meta-Down or not."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.denoiser.named_modules())
    out = {}
    for name, md in weights.items():
        if in_row_space:
            down = torch.randn(rank, md.shape[0], generator=g) @ md.flatten(1)
        else:
            down = torch.randn(rank, md[0].numel(), generator=g)
        up = torch.randn(modules[name].weight.shape[0], rank, generator=g) * 0.1
        out[name] = LoraWeight(down.reshape(rank, *md.shape[1:]), up, alpha)
    return LoraBundle(out)


def _deltas(bundle: LoraBundle) -> dict[str, torch.Tensor]:
    return {n: w.delta() for n, w in bundle.weights.items()}


def test_a_lora_in_the_row_space_is_the_exact_start():
    model = TinyDiffusion(seed=0)
    weights, meta, _ = _meta_down(model)
    given = _lora(model, weights, in_row_space=True)
    p = MetaLoraPersonalizer(model, _crops(model), MetaStage2Config(steps=1, rank=R2), weights, meta,
                             init_lora=given)
    start = p.bundle()
    assert set(start.weights) == set(given.weights)
    a, b = _deltas(start), _deltas(given)
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-5), (n, (a[n] - b[n]).abs().max())
    assert p.init_report["delta_error"] < 1e-5 and p.init_report["layers"] == len(weights)
    assert "delta_error" in start.metadata["idlora_init_lora"]


def test_otherwise_the_start_is_the_projection_and_its_error_is_reported():
    model = TinyDiffusion(seed=0)
    weights, meta, _ = _meta_down(model)
    given = _lora(model, weights, in_row_space=False, alpha=None)
    p = MetaLoraPersonalizer(model, _crops(model), MetaStage2Config(steps=1, rank=R2), weights, meta,
                             init_lora=given)
    start = _deltas(p.bundle())
    num = den = 0.0
    for n, w in given.weights.items():
        md = weights[n].flatten(1).double()
        proj = md.T @ torch.linalg.solve(md @ md.T, md)                  # projection onto the row space
        want = (w.up.double() @ w.down.flatten(1).double() @ proj).float().reshape(start[n].shape)
        assert torch.allclose(start[n], want, atol=1e-5), (n, (start[n] - want).abs().max())
        num += float((w.delta().flatten(1).double() @ proj - w.delta().flatten(1).double()).square().sum())
        den += float(w.delta().square().sum())
    err = p.init_report["delta_error"]
    assert 0.05 < err < 1 and err == pytest.approx((num / den) ** 0.5, rel=1e-4)


def test_mismatched_loras_are_refused_by_name():
    model = TinyDiffusion(seed=0)
    weights, meta, _ = _meta_down(model)

    def make(init, rank=R2):
        return MetaLoraPersonalizer(model, _crops(model, 1), MetaStage2Config(steps=1, rank=rank), weights, meta,
                                    init_lora=init)
    with pytest.raises(TrainingInputError, match=r"has rank 3, r2 = 2: set r2 to 3"):
        make(_lora(model, weights, True, rank=3))
    full = _lora(model, weights, True).weights
    name = sorted(full)[0]
    with pytest.raises(TrainingInputError, match=rf"lacks 1 of the Meta-Down's {len(full)} layers .*{name}"):
        make(LoraBundle({n: w for n, w in full.items() if n != name}))
    extra_name = next(n for n, m in model.denoiser.named_modules() if n.endswith("ff.net.2"))
    extra = dict(full, **{extra_name: LoraWeight(torch.zeros(R2, 64), torch.zeros(32, R2))})
    with pytest.raises(TrainingInputError, match=r"layers the Meta-Down does not train"):
        make(LoraBundle(extra))
    bad = dict(full, **{name: LoraWeight(torch.zeros(R2, 7), torch.zeros(full[name].up.shape[0], R2))})
    with pytest.raises(TrainingInputError, match=rf"layer '{name}' has delta shape"):
        make(LoraBundle(bad))
    with pytest.raises(TrainingInputError, match=r"init_lora is not a LoRA"):
        make(LoraBundle({}))


def test_training_from_the_init_changes_mid_and_up_only():
    model = TinyDiffusion(seed=0)
    weights, meta, _ = _meta_down(model)
    p = MetaLoraPersonalizer(model, _crops(model), MetaStage2Config(steps=3, rank=R2, learning_rate=1e-2),
                             weights, meta, init_lora=_lora(model, weights, True))
    net = p.network
    before = {k: [t.detach().clone() for t in d.values()] for k, d in
              (("md", net.meta_down), ("mid", net.mid), ("up", net.up))}
    p.run()
    assert p.step == 3 and all(torch.isfinite(torch.tensor(p.losses)))
    assert all(torch.equal(a, b) for a, b in zip(before["md"], net.meta_down.values()))
    assert any(not torch.equal(a, b) for a, b in zip(before["mid"], net.mid.values()))
    assert any(not torch.equal(a, b) for a, b in zip(before["up"], net.up.values()))


# -- the background job ---------------------------------------------------------------------------

def _loader(source: dict) -> TinyDiffusion:
    return TinyDiffusion(seed=source["seed"])


class SlowPersonalize(MetaPersonalizeTask):
    def run(self, ctx):
        step = MetaLoraPersonalizer.train_step

        def slow(trainer):
            time.sleep(0.03)
            return step(trainer)
        MetaLoraPersonalizer.train_step = slow
        try:
            return super().run(ctx)
        finally:
            MetaLoraPersonalizer.train_step = step


@pytest.fixture
def manager(tmp_path):
    m = JobManager(tmp_path / "jobs", checkpoint_every=2)
    m.register("meta_lora_personalize", lambda cfg, d: SlowPersonalize.from_config(cfg, d, _loader))
    yield m
    m.shutdown()


def test_the_job_keeps_the_init_across_cancel_and_resume(manager, tmp_path):
    model = TinyDiffusion(seed=0)
    weights, _, md_path = _meta_down(model, tmp_path)
    given = _lora(model, weights, True)
    cfg = MetaStage2Config(steps=8, rank=R2, learning_rate=1e-2)

    def task(name):
        return SlowPersonalize(cfg, str(md_path), str(tmp_path / f"{name}.safetensors"), f"idlora/{name}",
                               {"seed": 0}, _loader, _crops(model, 2), init_lora=given)
    ref = manager.submit(task("ref"), name="ref")
    manager.wait(ref.id, 120)
    assert ref.status.state == JobState.SUCCEEDED, ref.status.error
    assert ref.status.result["init_projection_error"] < 1e-5
    job = manager.submit(task("cut"), name="cut")
    t = time.time()
    while job.status.step < 3:
        assert time.time() - t < 60
        time.sleep(0.005)
    manager.cancel(job.id)
    manager.wait(job.id, 60)
    assert job.status.state == JobState.CANCELLED
    stored = torch.load(job.dir / "data.pt", weights_only=True)["init_lora"]
    assert set(stored) == set(given.weights) and torch.equal(stored[sorted(stored)[0]]["down"],
                                                             given.weights[sorted(stored)[0]].down)
    manager.resume(job.id)
    manager.wait(job.id, 120)
    assert job.status.state == JobState.SUCCEEDED, job.status.error
    a, b = load_lora(tmp_path / "ref.safetensors"), load_lora(tmp_path / "cut.safetensors")
    assert a.metadata["idlora_init_lora"] == b.metadata["idlora_init_lora"]
    da, db = _deltas(a), _deltas(b)
    assert max(float((da[k] - db[k]).abs().max()) for k in da) < 1e-6
