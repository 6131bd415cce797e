"""Identity-preserving stylization core: the identity term's gradients, that it really pulls the identity, that it
runs in the x0 steps only, its stylized target (content + style LoRA: gradients to both, the stylized face pulled
towards the photo), the ConsisLoRA noise-then-x0 schedule and its defaults, and the face-window decode (pure torch,
tiny models, seeded)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from idlora.training.diffusion import add_noise, target, to_x0
from idlora.models.lora import LoraNetwork, select_targets
from idlora.training.identity_loss import IdentityConfig, IdentityConfigError, IdentityLoss, face_window
from idlora.training.idstyle import (BLOCK_PRESETS, PAPER_STEPS, IdentityContentTrainer, IdentityStyleConfig,
                                     X0LoraTrainer, X0TrainConfig, frozen_network, lora_network)
from idlora.training.lora_trainer import TrainingInputError, prepare_data
from idstyle_util import SIZE, backbone, face_photo, landmarks_of
from tiny_torch import TinyDiffusion


@pytest.fixture(scope="module")
def photo():
    image = face_photo()
    return image, landmarks_of(image)


def identity_for(model: TinyDiffusion, image: torch.Tensor, lms: torch.Tensor, arc,
                 **cfg) -> IdentityLoss:
    refs = IdentityLoss.reference_embeddings(arc.embed, image.movedim(-1, 1), lms, 112)
    config = IdentityConfig(**{"weight": 1.0, "timestep_range": (0.0, 1.0), **cfg})
    return IdentityLoss(model.decoder(config.decoder), arc.embed, 112, lms, refs, (SIZE // 8, SIZE // 8), config)


CFG = dict(steps=40, learning_rate=3e-3, rank=4, seed=1, x0_start_step=0, targets="attn_ff")


def test_identity_gradients_reach_lora_through_decode_crop_and_backbone(photo):
    image, lms = photo
    model = TinyDiffusion(seed=0)
    data = prepare_data(model, image, "a photo of [c] person")
    trainer = IdentityContentTrainer(model, data, X0TrainConfig(**CFG), identity_for(model, image, lms, backbone()))
    with trainer.session():
        for _, layer in trainer.network.items():  # B = 0 at init would hide the gradient of A
            torch.nn.init.normal_(layer.up, std=1e-2)
        x0, cond, noise, sigma = trainer.sample_batch()
        _, x0_hat = trainer.predict(x0, cond, noise, sigma)
        term = trainer.identity(x0_hat, trainer.batch_idx).mean()
        term.backward()
    grads = [p.grad for p in trainer.network.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert 0.0 < float(term.detach()) < 2.0


def _eval_distance(trainer: IdentityContentTrainer, identity: IdentityLoss) -> float:
    """Mean 1 - cos between the decoded x0 estimate and the reference over fixed low-noise draws."""
    g = torch.Generator().manual_seed(123)
    x0, cond = trainer.data.batch(torch.tensor([0]))
    values = []
    with torch.no_grad(), trainer.network.attached():
        for t in (20, 60, 120, 200, 300):
            sigma = trainer.model.sigmas[t].reshape(1)
            noise = torch.randn(x0.shape, generator=g)
            out = trainer.model.net_forward(add_noise("eps", x0, noise, sigma), sigma, cond)
            x0_hat = to_x0(trainer.model.prediction_type, out, add_noise("eps", x0, noise, sigma), sigma)
            values.append(float(identity(x0_hat, torch.tensor([0])).mean()))
    return float(np.mean(values))


def test_identity_term_pulls_the_decoded_face_towards_the_reference(photo):
    image, lms = photo
    arc = backbone()
    results = {}
    for weight in (0.0, 3.0):
        model = TinyDiffusion(seed=0)
        data = prepare_data(model, image, "a photo of [c] person")
        identity = identity_for(model, image, lms, arc, weight=weight, timestep_range=(0.0, 0.4))
        trainer = IdentityContentTrainer(model, data, X0TrainConfig(**CFG), identity)
        start = _eval_distance(trainer, identity)
        trainer.run()
        results[weight] = (start, _eval_distance(trainer, identity))
    (s_off, e_off), (s_on, e_on) = results[0.0], results[3.0]
    assert s_off == pytest.approx(s_on)  # the same start: the same seed, a zero LoRA
    drop_off, drop_on = s_off - e_off, s_on - e_on
    # The x0 loss alone also pulls the identity (a better reconstruction); the term must pull clearly harder.
    # Measured: off 0.613 -> 0.480, on 0.613 -> 0.408. (The blocky toy decoder bounds how low it can go.)
    assert e_on < e_off - 0.04 and drop_on > 1.4 * drop_off, results


def test_x0_schedule_switches_loss_and_learning_rate():
    model = TinyDiffusion(seed=0)
    data = prepare_data(model, torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0)), "x")
    trainer = X0LoraTrainer(model, data, X0TrainConfig(steps=4, learning_rate=2e-4, x0_learning_rate=1e-4,
                                                       x0_start_step=2, rank=2))
    lrs, kinds = [], []
    with trainer.session():
        while trainer.step < 4:
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
            g = trainer.generator.get_state()
            x0, cond, noise, sigma = trainer.sample_batch()
            trainer.generator.set_state(g)
            with torch.no_grad():
                x_t = add_noise("eps", x0, noise, sigma)
                out = model.net_forward(x_t, sigma, cond)
                eps_loss = float(F.mse_loss(out, target("eps", x0, noise, sigma)))
                x0_loss = float(F.mse_loss(to_x0("eps", out, x_t, sigma), x0))
            loss = trainer.train_step()
            kinds.append("eps" if loss == pytest.approx(eps_loss, rel=1e-5) else
                         "x0" if loss == pytest.approx(x0_loss, rel=1e-5) else "?")
    assert kinds == ["eps", "eps", "x0", "x0"]
    assert lrs == pytest.approx([2e-4, 2e-4, 1e-4, 1e-4])


def test_frozen_network_is_attached_and_not_trained(photo):
    image, _ = photo
    model = TinyDiffusion(seed=0)
    data = prepare_data(model, image, "a [v]")
    first = X0LoraTrainer(model, data, X0TrainConfig(steps=5, learning_rate=1e-2, rank=2, targets="attn"))
    bundle = first.run()
    frozen = frozen_network(model, bundle)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    second = X0LoraTrainer(model, data, X0TrainConfig(steps=3, learning_rate=1e-2, rank=2, targets="ff"), [frozen])
    x0, cond = data.batch(torch.tensor([0]))
    sigma = model.sigmas[100].reshape(1)
    with torch.no_grad():
        plain = model.net_forward(x0, sigma, cond)
        with second.session():
            with_frozen = model.net_forward(x0, sigma, cond)
    assert not torch.allclose(plain, with_frozen)  # the frozen LoRA takes part
    second.run()
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())
    assert not frozen._handles  # detached after the session


def test_face_window_covers_the_crop_and_saves_decode_work(photo):
    image, lms = photo
    y0, y1, x0, x1 = face_window(lms[0], (SIZE // 8, SIZE // 8), 112, margin=1)
    assert 0 <= y0 < y1 <= SIZE // 8 and 0 <= x0 < x1 <= SIZE // 8
    inside = lms[0] / 8
    assert (inside[:, 0] >= x0).all() and (inside[:, 0] <= x1).all()
    assert (inside[:, 1] >= y0).all() and (inside[:, 1] <= y1).all()
    model = TinyDiffusion(seed=0)
    arc = backbone()
    full = identity_for(model, image, lms, arc, face_region=False)
    window = identity_for(model, image, lms, arc, face_region=True, margin=2)
    assert window.windows[0] != full.windows[0]
    latents = model.encode_images(image)
    a, b = full.faces(latents, torch.tensor([0])), window.faces(latents, torch.tensor([0]))
    assert torch.allclose(a, b, atol=1e-5)  # the tiny decoder is local: the window decode is exact


def test_bad_settings_name_the_value_and_fix():
    with pytest.raises(IdentityConfigError, match=r"weight = -1.*>= 0"):
        IdentityConfig(weight=-1).validate()
    with pytest.raises(IdentityConfigError, match=r"decoder = 'sdxl'.*vae"):
        IdentityConfig(decoder="sdxl").validate()
    with pytest.raises(IdentityConfigError, match=r"timestep_range"):
        IdentityConfig(timestep_range=(0.5, 0.2)).validate()
    with pytest.raises(TrainingInputError, match=r"x0_start_step = 9.*steps = 4"):
        X0TrainConfig(steps=4, x0_start_step=9).validate()


def test_block_presets_select_disjoint_blocks_on_a_comfy_style_unet():
    names = [f"{b}.{i}.1.transformer_blocks.0.attn{a}.to_{p}" for b in ("input_blocks", "output_blocks")
             for i in range(6) for a in (1, 2) for p in ("q", "k", "v")]
    import re
    for preset, (content, style, doc) in BLOCK_PRESETS.items():
        assert doc
        if preset in ("sd15_down_up", "sd15_blora"):
            c = {n for n in names if re.search(content, n)}
            s = {n for n in names if re.search(style, n)}
            assert c and s and not c & s, preset


# -- the x0 phase only ----------------------------------------------------------------------------------------


class CountingIdentity:
    """An IdentityLoss that records the trainer step (0-based) of each call."""

    def __init__(self, identity: IdentityLoss, trainer_ref: list):
        self.inner, self.cfg, self.ref, self.steps = identity, identity.cfg, trainer_ref, []

    def __call__(self, x0_hat, idx):
        self.steps.append(self.ref[0].step)
        return self.inner(x0_hat, idx)


def random_style(model: TinyDiffusion, targets: str = "attn", seed: int = 5) -> LoraNetwork:
    """A trainable style LoRA with nonzero up factors (a stand-in for a trained one)."""
    net = LoraNetwork(select_targets(model.denoiser, targets), 4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in net.items():
            layer.up.copy_(torch.randn(layer.up.shape, generator=g) * 0.05)
    return net


@pytest.mark.parametrize("target", ["reconstruction", "stylized"])
def test_identity_term_runs_only_in_the_x0_steps(photo, target):
    """x0_start_step = 3 of 6: the noise-loss steps 0-2 never compute the identity term (no call, no recorded value;
    with the stylized target the style LoRA, which only the term updates, is untouched by them)."""
    image, lms = photo
    model = TinyDiffusion(seed=0)
    data = prepare_data(model, image, "a photo of [c] person")
    ref: list = []
    identity = CountingIdentity(identity_for(model, image, lms, backbone()), ref)
    style = random_style(model) if target == "stylized" else None
    cfg = X0TrainConfig(steps=6, learning_rate=1e-3, rank=2, seed=1, x0_start_step=3, targets="attn")
    trainer = IdentityContentTrainer(model, data, cfg, identity, style=style)
    ref.append(trainer)
    before = {k: v.clone() for k, v in style.state_dict().items()} if style is not None else {}
    with trainer.session():
        for _ in range(3):
            trainer.train_step()
        assert identity.steps == [] and trainer.identity_values == []  # not computed in the noise-loss steps
        if style is not None:
            assert all(torch.equal(before[k], v) for k, v in style.state_dict().items())
        while trainer.step < cfg.steps:
            trainer.train_step()
    assert identity.steps == [3, 4, 5]
    assert [s for s, _ in trainer.identity_values] == [4, 5, 6]  # 1-based, as the job reports steps
    if style is not None:
        assert any(not torch.equal(before[k], v) for k, v in style.state_dict().items())


# -- the stylized target: content + style LoRA -----------------------------------------------------------------


def test_stylized_identity_gradients_reach_both_loras_through_decode_crop_and_backbone(photo):
    image, lms = photo
    model = TinyDiffusion(seed=0)
    data = prepare_data(model, image, "a photo of [c] person")
    style = random_style(model, "attn_ff")
    stylized = model.encode_prompts(["a photo of [c] person in the style of [v]"], SIZE, SIZE)
    trainer = IdentityContentTrainer(model, data, X0TrainConfig(**CFG), identity_for(model, image, lms, backbone()),
                                     style=style, stylized_cond=stylized)
    with trainer.session():
        for _, layer in trainer.network.items():  # B = 0 at init would hide the gradient of A
            torch.nn.init.normal_(layer.up, std=1e-2)
        x0, cond, noise, sigma = trainer.sample_batch()
        x0_sty = trainer.stylized_x0(x0, cond, noise, sigma, trainer.batch_idx)
        with torch.no_grad():
            _, x0_rec = trainer.predict(x0, cond, noise, sigma)
        assert not torch.allclose(x0_sty, x0_rec)  # the style LoRA and the stylized prompt take part
        assert not style._handles  # attached for that pass only
        term = trainer.identity(x0_sty, trainer.batch_idx).mean()
        with style.attached():
            term.backward()
    for net in (trainer.network, style):
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert all(float(g.abs().sum()) > 0 for g in grads)  # every factor of every layer of both LoRAs
    assert 0.0 < float(term.detach()) < 2.0


def test_stylized_x0_loss_reaches_the_content_lora_only(photo):
    """One training step's pieces: the x0 loss gives the style LoRA no gradient; the identity term gives it one."""
    image, lms = photo
    model = TinyDiffusion(seed=0)
    data = prepare_data(model, image, "a photo of [c] person")
    style = random_style(model)
    trainer = IdentityContentTrainer(model, data, X0TrainConfig(**CFG), identity_for(model, image, lms, backbone()),
                                     style=style)
    with trainer.session():
        x0, cond, noise, sigma = trainer.sample_batch()
        total = trainer.loss(x0, cond, noise, sigma)
        (base, base_styled), (term, term_styled) = trainer._deferred
        assert (base_styled, term_styled) == (False, True)
        assert total.item() == pytest.approx(base.item() + term.item())
        base.backward()
        assert all(p.grad is None for p in style.parameters())
        with style.attached():
            term.backward()
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in style.parameters())


def _train_stylized(photo, **cfg) -> tuple[dict, dict]:
    image, lms = photo
    model = TinyDiffusion(seed=0)
    data = prepare_data(model, image, "a photo of [c] person")
    style = random_style(model)
    trainer = IdentityContentTrainer(model, data, X0TrainConfig(**dict(CFG, steps=3, **cfg)),
                                     identity_for(model, image, lms, backbone()), style=style)
    trainer.run()
    return trainer.network.state_dict(), style.state_dict()


def test_stylized_training_is_the_same_with_gradient_checkpointing(photo):
    """A checkpointed block recomputes its forward in backward: each part of the loss is backpropagated with the
    LoRAs its forward had, so checkpointing changes nothing (it would, were the style LoRA missing then)."""
    content_a, style_a = _train_stylized(photo)
    content_b, style_b = _train_stylized(photo, gradient_checkpointing=True)
    for a, b in ((content_a, content_b), (style_a, style_b)):
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _stylized_distance(trainer: IdentityContentTrainer, identity: IdentityLoss, style: LoraNetwork,
                       stylized: dict) -> float:
    """Mean 1 - cos between the decoded stylized x0 (content + style LoRA, stylized prompt) and the photo's
    embedding over fixed low-noise draws."""
    g = torch.Generator().manual_seed(123)
    x0, _ = trainer.data.batch(torch.tensor([0]))
    values = []
    with torch.no_grad(), trainer.network.attached(), style.attached():
        for t in (20, 60, 120, 200, 300):
            sigma = trainer.model.sigmas[t].reshape(1)
            x_t = add_noise("eps", x0, torch.randn(x0.shape, generator=g), sigma)
            out = trainer.model.net_forward(x_t, sigma, stylized)
            values.append(float(identity(to_x0("eps", out, x_t, sigma), torch.tensor([0])).mean()))
    return float(np.mean(values))


def test_stylized_identity_term_pulls_the_stylized_face_towards_the_photo(photo):
    """Seeded: a style LoRA trained on another image (the style phase, shortened), then the content phase with the
    stylized identity term off and on. With it on, the stylized output's embedding distance to the photo falls
    clearly faster."""
    image, lms = photo
    arc = backbone()
    style_image = face_photo("astronaut.jpg")
    first = TinyDiffusion(seed=0)
    style_bundle = X0LoraTrainer(first, prepare_data(first, style_image, "an image in the style of [v]"),
                                 X0TrainConfig(steps=10, learning_rate=2e-2, rank=4, seed=2, targets="attn_ff")).run()
    results = {}
    for weight in (0.0, 3.0):
        model = TinyDiffusion(seed=0)
        data = prepare_data(model, image, "a photo of [c] person")
        stylized = model.encode_prompts(["a photo of [c] person in the style of [v]"], SIZE, SIZE)
        identity = identity_for(model, image, lms, arc, weight=weight, timestep_range=(0.0, 0.4))
        style = lora_network(model, style_bundle, trainable=True)
        trainer = IdentityContentTrainer(model, data, X0TrainConfig(**dict(CFG, steps=20, learning_rate=5e-3)),
                                         identity, style=style, stylized_cond=stylized)
        start = _stylized_distance(trainer, identity, style, stylized)
        trainer.run()
        results[weight] = (start, _stylized_distance(trainer, identity, style, stylized))
    (s_off, e_off), (s_on, e_on) = results[0.0], results[3.0]
    assert s_off == pytest.approx(s_on)  # the same start: the same seed, a zero content LoRA, the same style LoRA
    drop_off, drop_on = s_off - e_off, s_on - e_on
    # Measured: off 0.444 -> 0.399, on 0.444 -> 0.315 (the reconstruction target, same run: -> 0.361).
    assert e_on < e_off - 0.04 and drop_on > 2 * drop_off, results


def test_stylized_target_settings_are_checked(photo):
    image, lms = photo
    model = TinyDiffusion(seed=0)
    data = prepare_data(model, image, "x")
    with pytest.raises(IdentityConfigError, match=r"target = 'styled'.*stylized.*reconstruction"):
        IdentityConfig(target="styled").validate()
    with pytest.raises(TrainingInputError, match="no identity term"):
        IdentityContentTrainer(model, data, X0TrainConfig(steps=2, rank=2), None, style=random_style(model))
    frozen = random_style(model).requires_grad_(False)
    with pytest.raises(TrainingInputError, match="frozen.*trainable=True"):
        IdentityContentTrainer(model, data, X0TrainConfig(steps=2, rank=2), identity_for(model, image, lms,
                                                                                        backbone()), style=frozen)
    with pytest.raises(TrainingInputError, match=r"content\.compile.*stylized"):
        IdentityStyleConfig(content=X0TrainConfig(compile=True)).validate()
    IdentityStyleConfig(content=X0TrainConfig(compile=True),
                        identity=IdentityConfig(target="reconstruction")).validate()  # fine there


def test_defaults_are_consislora_step_counts_and_the_phase_order_follows_the_target():
    cfg = IdentityStyleConfig()
    assert (cfg.content.steps, cfg.content.x0_start_step, cfg.style_content_steps, cfg.style.steps) == \
        (PAPER_STEPS["content"], PAPER_STEPS["x0_start_step"], PAPER_STEPS["style_content"], PAPER_STEPS["style"]) \
        == (1500, 500, 1500, 1000)
    assert cfg.identity.target == "stylized" and cfg.decouple().x0_start_step == 500
    assert cfg.phases() == ["style_content", "style", "content"]
    assert IdentityStyleConfig(identity=IdentityConfig(target="reconstruction")).phases() == \
        ["content", "style_content", "style"]
    assert IdentityStyleConfig(identity=IdentityConfig(weight=0.0)).phases() == ["content", "style_content", "style"]
    assert IdentityStyleConfig(style_content_steps=0).phases() == ["style", "content"]
