"""The plain LoRA trainer on a tiny pure-torch diffusion model."""
import math

import pytest
import torch

from idlora.training import diffusion as dm
from idlora.training.lora_format import load_lora, save_lora
from idlora.training.lora_trainer import (LoraTrainConfig, LoraTrainer, NonFiniteLossError, TrainingInputError,
                                          checkpointed_blocks, prepare_data)
from tiny_torch import TinyDiffusion, images


def _train(pred="eps", steps=30, **kw):
    model = TinyDiffusion(pred)
    data = prepare_data(model, images(2), "a photo of sks person")
    trainer = LoraTrainer(model, data, LoraTrainConfig(steps=steps, learning_rate=3e-3, rank=4, **kw))
    return model, trainer, trainer.run()


@pytest.mark.parametrize("pred", ["eps", "v"])
def test_loss_goes_down(pred):
    _, trainer, bundle = _train(pred, steps=60)
    first, last = sum(trainer.losses[:10]) / 10, sum(trainer.losses[-10:]) / 10
    assert last < first * 0.9, (first, last)
    assert bundle.metadata["idlora_prediction_type"] == pred
    assert any(torch.count_nonzero(w.up) for w in bundle.weights.values())


def test_same_seed_same_lora_other_seed_differs():
    _, _, a = _train(steps=5, seed=3)
    _, _, b = _train(steps=5, seed=3)
    _, _, c = _train(steps=5, seed=4)
    for k in a.weights:
        assert torch.equal(a.weights[k].up, b.weights[k].up)
    assert any(not torch.equal(a.weights[k].up, c.weights[k].up) for k in a.weights)


def test_base_model_untouched_and_hooks_removed():
    model = TinyDiffusion()
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    LoraTrainer(model, prepare_data(model, images(1), "x"), LoraTrainConfig(steps=3, rank=2)).run()
    after = model.denoiser.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks for m in model.denoiser.modules())


def test_trainer_forward_matches_saved_file(tmp_path):
    model, trainer, bundle = _train(steps=10)
    path = save_lora(tmp_path / "l.safetensors", bundle.weights, bundle.metadata, dtype=None)
    loaded = load_lora(path)
    x, sigma = torch.randn(1, 4, 4, 4), torch.tensor([2.0])
    cond = {"context": torch.randn(1, 8, 16)}
    with torch.no_grad(), trainer.network.attached():
        hooked = model.net_forward(x, sigma, cond)
    with torch.no_grad():  # merge the file's weights by hand: W += scale * up @ down
        for n, w in loaded.weights.items():
            name = n.replace("lora_unet_", "")
            mod = dict(model.denoiser.named_modules())[next(k for k in trainer.network.names
                                                             if k.replace(".", "_") == name)]
            mod.weight += w.delta(mod.weight.shape)
        merged = model.net_forward(x, sigma, cond)
    torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_same_result():
    _, _, a = _train(steps=4, gradient_checkpointing=False)
    _, _, b = _train(steps=4, gradient_checkpointing=True)
    for k in a.weights:
        torch.testing.assert_close(a.weights[k].up, b.weights[k].up, rtol=1e-4, atol=1e-6)


def test_checkpointed_blocks_restores_forward():
    model = TinyDiffusion()
    blk = model.denoiser.blocks[0]
    with checkpointed_blocks(model.denoiser) as n:
        assert n == 2 and "forward" in vars(blk)
    assert "forward" not in vars(blk)


def test_non_finite_loss_names_the_step():
    model = TinyDiffusion()
    data = prepare_data(model, images(1), "x")
    trainer = LoraTrainer(model, data, LoraTrainConfig(steps=10, rank=2))
    real = trainer.loss
    trainer.loss = lambda *a: real(*a) * (float("nan") if trainer.step == 3 else 1.0)
    with pytest.raises(NonFiniteLossError, match="at step 4"):
        trainer.run()
    assert trainer.step == 3


def test_bad_inputs_name_the_input():
    model = TinyDiffusion()
    with pytest.raises(TrainingInputError, match="empty"):
        prepare_data(model, torch.zeros(0, 32, 32, 3), "x")
    with pytest.raises(TrainingInputError, match="prompt has 3 lines but images has 2"):
        prepare_data(model, images(2), "a\nb\nc")
    data = prepare_data(model, images(2), "a\nb")
    assert data.prompts == ["a", "b"]
    for bad in [dict(rank=0), dict(rank=-1), dict(steps=0), dict(learning_rate=float("nan")),
                dict(precision="fp8"), dict(timestep_range=(0.5, 0.2))]:
        field = next(iter(bad))
        with pytest.raises(TrainingInputError, match=field):
            LoraTrainConfig(**bad).validate()


@pytest.mark.parametrize("pred", ["eps", "v", "x0", "flow"])
def test_prediction_conversions_are_consistent(pred):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.97]) if pred == "flow" else torch.tensor([0.1, 1.0, 14.0])
    xt = dm.add_noise(pred, x0, noise, sigma)
    out = dm.target(pred, x0, noise, sigma)  # a perfect network output
    torch.testing.assert_close(dm.to_x0(pred, out, xt, sigma), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dm.to_eps(pred, out, xt, sigma), noise, rtol=1e-4, atol=1e-4)


def test_sd_sigmas_match_known_values():
    s = dm.sd_sigmas()
    assert len(s) == 1000 and torch.all(s[1:] > s[:-1])
    assert math.isclose(s[0].item(), 0.0292, rel_tol=1e-2) and math.isclose(s[-1].item(), 14.6146, rel_tol=1e-3)
