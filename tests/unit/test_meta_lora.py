"""Meta-LoRA core on a tiny pure-torch model: exact collapse, what stage 1's warm-up and stage 2 update, buckets
and off-device identities, checkpoint resume, and Meta-Down files and their errors."""
from __future__ import annotations

import pytest
import torch

from idlora.models.lora import LoraNetwork, select_targets
from idlora.models.meta_lora import MetaLoraNetwork
from idlora.training.lora_trainer import TrainingInputError, prepare_data
from idlora.training.meta_lora import (IdentitySet, MetaDownError, MetaLoraPersonalizer, MetaLoraStage1,
                                       MetaStage2Config, load_meta_down, save_meta_down)
from meta_lora_util import N_IDS, crops as _crops, identity_set, stage1_cfg
from tiny_torch import TinyDiffusion, images

def test_three_factor_forward_equals_its_collapsed_lora():
    torch.manual_seed(0)
    model = TinyDiffusion(seed=0)
    targets = select_targets(model.denoiser, "all_linear_conv")
    net = MetaLoraNetwork(targets, r1=8, r2=2, slots=3)
    with torch.no_grad():
        for k in net.up:
            net.up[k].normal_(std=0.1)
    x = torch.randn(1, 4, 8, 8)
    sigma, cond = model.sigmas[200].reshape(1), {"context": torch.randn(1, 8, 16)}
    net.set_slots(torch.tensor([2]))
    with torch.no_grad(), net.attached():
        three = model.net_forward(x, sigma, cond)
    collapsed = net.collapse(2)
    lora = LoraNetwork(targets, rank=2)
    for n, layer in lora.items():
        d, u, a = collapsed[n]
        layer.set_weights(d, u, a)
    with torch.no_grad(), lora.attached():
        two = model.net_forward(x, sigma, cond)
    with torch.no_grad():
        base = model.net_forward(x, sigma, cond)
    assert (three - base).abs().max() > 1e-3  # the adapter does something
    assert torch.allclose(three, two, atol=1e-5), (three - two).abs().max()


def test_mixed_identities_in_one_batch_use_their_own_slots():
    model = TinyDiffusion(seed=0)
    net = MetaLoraNetwork(select_targets(model.denoiser, "attn"), r1=8, r2=1, slots=2)
    with torch.no_grad():
        for k in net.up:
            net.up[k].normal_(std=0.1)
    x = torch.randn(2, 4, 8, 8)
    sigma, cond = model.sigmas[[100, 100]], {"context": torch.randn(2, 8, 16)}
    with torch.no_grad(), net.attached():
        net.set_slots(torch.tensor([0, 1]))
        mixed = model.net_forward(x, sigma, cond)
        net.set_slots(torch.tensor([1, 1]))
        ones = model.net_forward(x, sigma, cond)
        net.set_slots(torch.tensor([0, 0]))
        zeros = model.net_forward(x, sigma, cond)
    assert torch.allclose(mixed[0], zeros[0], atol=1e-6) and torch.allclose(mixed[1], ones[1], atol=1e-6)
    assert not torch.allclose(zeros[1], ones[1])


def _snapshot(net: MetaLoraNetwork):
    return ({k: v.detach().clone() for k, v in net.meta_down.items()},
            {k: v.detach().clone() for k, v in net.mid.items()}, {k: v.detach().clone() for k, v in net.up.items()})


def _changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_warmup_updates_only_the_bucket_identities_then_everything():
    model = TinyDiffusion(seed=0)
    trainer = MetaLoraStage1(model, identity_set(model), stage1_cfg(bucket_steps=5, warmup_fraction=0.4))
    assert (trainer.q_bucket, trainer.q_warmup) == (5, 2)
    with trainer.session():
        before = _snapshot(trainer.network)
        trainer.train_step()
        trainer.train_step()
        warm = _snapshot(trainer.network)
        assert not _changed(before[0], warm[0])  # Meta-Down frozen during the warm-up
        assert _changed(before[2], warm[2])       # the bucket's Up learned
        trainer.train_step()
        after = _snapshot(trainer.network)
        assert _changed(warm[0], after[0]) and _changed(warm[2], after[2])
    assert [w for _, w in trainer.warmup_log] == [True, True, False]


def test_buckets_cycle_identities_and_keep_them_off_the_device():
    model = TinyDiffusion(seed=0)
    trainer = MetaLoraStage1(model, identity_set(model), stage1_cfg(bucket_steps=3))
    seen = []
    with trainer.session():
        for _ in range(9):
            if trainer.in_bucket == 0:
                seen.append(trainer.bucket_ids(trainer.bucket_index))
            trainer.train_step()
    assert [len(b) for b in seen] == [2, 2, 1]
    assert sorted(i for b in seen for i in b) == list(range(N_IDS))
    assert set(trainer.store) == set(range(N_IDS))
    assert all(t.device.type == "cpu" for s in trainer.store.values() for t in s.values())
    assert trainer.network.mid[next(iter(trainer.network.mid))].shape[0] == 2  # two slots on the device


def test_stage1_resume_from_checkpoint_equals_uninterrupted():
    def run(stop_at=None):
        model = TinyDiffusion(seed=0)
        t = MetaLoraStage1(model, identity_set(model), stage1_cfg(steps=14, bucket_steps=4))
        with t.session():
            while t.step < (stop_at or 14):
                t.train_step()
        return t, model
    ref, _ = run()
    cut, _ = run(stop_at=6)  # inside the second bucket, after its warm-up
    state = cut.state_dict()
    model = TinyDiffusion(seed=0)
    resumed = MetaLoraStage1(model, identity_set(model), stage1_cfg(steps=14, bucket_steps=4))
    resumed.load_state_dict(state)
    with resumed.session():
        while resumed.step < 14:
            resumed.train_step()
    for k in ref.network.meta_down:
        assert torch.allclose(ref.network.meta_down[k], resumed.network.meta_down[k], atol=1e-6)


def _meta_down_file(tmp_path, model, **kw):
    trainer = MetaLoraStage1(model, identity_set(model), stage1_cfg(steps=6, **kw))
    trainer.run()
    path = tmp_path / "md.safetensors"
    save_meta_down(path, trainer.network, trainer.meta_down_metadata("md"))
    return path, trainer


def test_stage2_trains_only_mid_and_up_and_collapses_to_a_kohya_lora(tmp_path):
    model = TinyDiffusion(seed=0)
    path, stage1 = _meta_down_file(tmp_path, model)
    weights, meta = load_meta_down(path)
    assert meta["idlora_r1"] == "8" and meta["idlora_base_model"] == "tiny"
    p2 = MetaLoraPersonalizer(model, _crops(model), MetaStage2Config(steps=6, rank=2, learning_rate=1e-2),
                              weights, meta)
    before = _snapshot(p2.network)
    bundle = p2.run()
    after = _snapshot(p2.network)
    assert not _changed(before[0], after[0])
    assert _changed(before[1], after[1]) and _changed(before[2], after[2])
    trainable = sum(p.numel() for p in p2.trainable_parameters())
    full_down = sum(w.numel() for w in weights.values())
    assert trainable < full_down  # 8*r2 + r2*N per block instead of M*r2 + r2*N
    w = next(iter(bundle.weights.values()))
    assert w.down.shape[0] == 2 and w.alpha == 2.0
    assert bundle.metadata["idlora_method"] == "meta_lora"


def test_meta_down_errors_name_the_problem(tmp_path):
    model = TinyDiffusion(seed=0)
    path, _ = _meta_down_file(tmp_path, model)
    weights, meta = load_meta_down(path)
    other = TinyDiffusion(seed=0, ctx_dim=24)  # attn2.to_k/to_v take 24 features instead of 16
    with pytest.raises(MetaDownError, match=r"does not fit this model: input shapes differ"):
        MetaLoraPersonalizer(other, _crops(other), MetaStage2Config(steps=1), weights, meta)
    with pytest.raises(MetaDownError, match=r"trained on base model 'sd15', this model is 'tiny'"):
        MetaLoraPersonalizer(model, _crops(model), MetaStage2Config(steps=1), weights,
                             dict(meta, idlora_base_model="sd15"))
    from idlora.training.meta_lora import check_meta_down
    with pytest.raises(MetaDownError, match=r"has rank r1 = 8, the settings ask for r1 = 16"):
        check_meta_down(weights, meta, model, r1=16)
    lora_file = tmp_path / "plain.safetensors"
    from idlora.training.lora_format import save_lora
    from idlora.training.lora_trainer import LoraTrainConfig, LoraTrainer
    bundle = LoraTrainer(model, prepare_data(model, images(1), "x"), LoraTrainConfig(steps=1, rank=2)).run()
    save_lora(lora_file, bundle.weights, bundle.metadata)
    with pytest.raises(MetaDownError, match=r"not a Meta-Down file"):
        load_meta_down(lora_file)
    with pytest.raises(FileNotFoundError, match=r"models/idlora/meta_down"):
        load_meta_down(tmp_path / "missing.safetensors")


def test_an_identity_without_images_is_refused():
    with pytest.raises(TrainingInputError, match=r"identities \['b'\] have no images"):
        IdentitySet(["a", "b"], torch.zeros(2, 4, 2, 2), {"context": torch.zeros(2, 8, 16)}, torch.tensor([0, 0]))


def test_bad_ranks_are_refused():
    with pytest.raises(TrainingInputError, match=r"r2 = 4 is larger than r1 = 2"):
        stage1_cfg(r1=2, rank=4).validate()
