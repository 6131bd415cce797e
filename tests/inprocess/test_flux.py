"""Flow matching on ComfyUI's own Flux classes, in-process: the algebra against ComfyUI's model_sampling, a LoRA
trained on a tiny Flux-architecture DiT, its file through the stock LoraLoader, fp8 base weights, bad inputs."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy


def _draws(seed: int, n: int = 4, shape=(16, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g)
    return x0, noise, torch.rand(n, generator=g).clamp(0.02, 0.98)


@pytest.mark.parametrize("flux", [True, False], ids=["flux", "sd3_flow"])
def test_flow_algebra_round_trips_and_agrees_with_comfy(comfy, flux):
    """x_t, the target, to_x0 and to_eps against ComfyUI's CONST calculate_input / calculate_denoised /
    noise_scaling, on the model_sampling ComfyUI builds for Flux (ModelSamplingFlux) and for SD3 (DiscreteFlow)."""
    import comfy.model_sampling as ms_mod
    import comfy.supported_models
    from idlora.training import diffusion as dm

    cfg_cls = comfy.supported_models.Flux if flux else comfy.supported_models.SD3
    base_cls = ms_mod.ModelSamplingFlux if flux else ms_mod.ModelSamplingDiscreteFlow

    class Sampling(base_cls, ms_mod.CONST):
        pass

    ms = Sampling(cfg_cls({"image_model": "flux"} if flux else {"in_channels": 16}))
    x0, noise, sigma = _draws(0)
    x_t = dm.add_noise("flow", x0, noise, sigma)
    torch.testing.assert_close(x_t, ms.noise_scaling(sigma, noise, x0))
    torch.testing.assert_close(ms.calculate_input(sigma, x_t), x_t)
    out = dm.target("flow", x0, noise, sigma)  # a perfect network
    torch.testing.assert_close(dm.to_x0("flow", out, x_t, sigma), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dm.to_eps("flow", out, x_t, sigma), noise, rtol=1e-5, atol=1e-5)
    any_out = torch.randn_like(x0)  # and any output, against ComfyUI's own x0
    torch.testing.assert_close(dm.to_x0("flow", any_out, x_t, sigma), ms.calculate_denoised(sigma, any_out, x_t))
    assert 0 < float(ms.sigmas.min()) < float(ms.sigmas.max()) <= 1.0


def test_flux_shift_matches_comfy_model_sampling_flux(comfy):
    """The 'shift' sampler's mu is the shift ComfyUI's ModelSamplingFlux node sets for the image size, and its time
    shift is ComfyUI's flux_time_shift."""
    import comfy.model_sampling as ms_mod
    import comfy_extras.nodes_model_advanced as adv
    import comfy_tiny
    from idlora.training import diffusion as dm

    patcher = comfy_tiny.tiny_flux()
    t = torch.tensor([0.1, 0.5, 0.9])
    for px in (512, 768, 1024):
        (patched,) = adv.ModelSamplingFlux().patch(patcher, dm.FLUX_MAX_SHIFT, dm.FLUX_BASE_SHIFT, px, px)
        comfy_mu = patched.object_patches["model_sampling"].shift
        assert dm.flux_mu(px // 8, px // 8) == pytest.approx(comfy_mu)
        torch.testing.assert_close(dm.time_shift(comfy_mu, t),
                                   torch.tensor([ms_mod.flux_time_shift(comfy_mu, 1.0, float(v)) for v in t]))


def test_samplers_draw_in_range_and_refuse_flow_kinds_on_unets(comfy):
    from idlora.training import diffusion as dm
    from tiny_torch import TinyDiffusion

    flow, eps = TinyDiffusion("flow"), TinyDiffusion("eps")
    g = torch.Generator().manual_seed(0)
    for kind in ("uniform", "logit_normal", "shift", "auto"):
        s = dm.sample_sigmas(flow, kind, 4000, g, (64, 64), (0.2, 0.9))
        assert 0.2 - 1e-6 <= float(s.min()) and float(s.max()) <= 0.9 + 1e-6
    shifted = dm.sample_sigmas(flow, "shift", 4000, g, (128, 128)).mean()
    plain = dm.sample_sigmas(flow, "logit_normal", 4000, g, (128, 128)).mean()
    assert shifted > plain + 0.1  # 1024 px: mu 1.15 moves sigma towards noise
    assert dm.default_timestep_sampling(eps) == "uniform"
    with pytest.raises(ValueError, match="timestep_sampling = 'shift' is for flow-matching models.*use uniform"):
        dm.sample_sigmas(eps, "shift", 2, g, (8, 8))


def _trainer(patcher, steps=6, **cfg):
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.lora_trainer import LoraTrainConfig, LoraTrainer, TrainData
    import comfy_tiny

    diffusion = ComfyDiffusion(patcher, load=cfg.pop("load", "shared"))
    data = TrainData(torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)),
                     comfy_tiny.tiny_flux_cond(2, 1))
    conf = dict(steps=steps, learning_rate=2e-2, rank=4, targets="flux_attn")
    conf.update(cfg)
    return LoraTrainer(diffusion, data, LoraTrainConfig(**conf))


def _held_out_loss(trainer, seed=7, n=6) -> float:
    """The flow loss on fixed (x0, noise, sigma) draws of the training latents."""
    from idlora.training.diffusion import add_noise, target
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(n) % len(trainer.data)
    x0, cond = trainer.data.batch(idx)
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.rand(n, generator=g).clamp(0.05, 0.95)
    with torch.no_grad(), trainer.network.attached():
        out = trainer.model.net_forward(add_noise("flow", x0, noise, sigma), sigma, cond)
    return float(torch.nn.functional.mse_loss(out.float(), target("flow", x0, noise, sigma)))


def test_lora_on_tiny_flux_lowers_held_out_loss_and_feeds_guidance(comfy):
    import comfy_tiny

    trainer = _trainer(comfy_tiny.tiny_flux(), steps=30, guidance=1.0)
    assert trainer.model.prediction_type == "flow" and trainer.model.guidance_embed
    names = set(trainer.network.names)
    assert {"double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj", "single_blocks.0.linear1",
            "single_blocks.0.linear2"} <= names
    before = _held_out_loss(trainer)
    trainer.run()
    after = _held_out_loss(trainer)
    assert after < 0.9 * before, (before, after)
    # the guidance value reaches the model: another value gives another output
    x, s, cond = torch.randn(1, 16, 8, 8), torch.tensor([0.5]), comfy_tiny.tiny_flux_cond(1, 2)
    with torch.no_grad():
        a = trainer.model.net_forward(x, s, {**cond, "guidance": torch.tensor([1.0])})
        b = trainer.model.net_forward(x, s, {**cond, "guidance": torch.tensor([4.0])})
    assert (a - b).abs().max() > 1e-4


def test_bad_inputs_name_the_input_and_the_fix(comfy):
    import comfy_tiny
    from idlora.training.config import TrainingInputError

    with pytest.raises(TrainingInputError, match=r"guidance = 3\.5 is set.*no guidance embedding.*leave guidance"):
        _trainer(comfy_tiny.tiny_flux(guidance=False), guidance=3.5)
    with pytest.raises(TrainingInputError, match="'attn' is a preset for U-Net models.*flux_attn"):
        _trainer(comfy_tiny.tiny_flux(), targets="attn")
    with pytest.raises(TrainingInputError, match="'flux_attn' is a preset for Flux.*this model is a U-Net"):
        from idlora.nodes.comfy_adapter import ComfyDiffusion
        from idlora.training.lora_trainer import LoraTrainConfig, LoraTrainer, TrainData
        sd = comfy_tiny.tiny_sd15()
        LoraTrainer(ComfyDiffusion(sd), TrainData(torch.randn(1, 4, 8, 8), comfy_tiny.tiny_cond("sd15", sd, 1, 0)),
                    LoraTrainConfig(steps=1, targets="flux_attn"))


def test_fp8_base_step_matches_bf16_base_step(comfy):
    """The base stored in float8_e4m3fn (Linear layers cast on the fly, LoRA in fp32) gives the loss of the same
    step with the base stored in bf16, within fp8's rounding (e4m3 keeps 3 mantissa bits: ~6% per weight)."""
    import comfy_tiny

    losses, stored = {}, {}
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        patcher = comfy_tiny.tiny_flux(weight_dtype=dtype)
        trainer = _trainer(patcher, steps=1, load="private")
        stored[dtype] = trainer.model.denoiser.double_blocks[0].img_attn.qkv.weight.dtype
        with trainer.session():
            losses[dtype] = trainer.train_step()
        assert all(p.dtype == torch.float32 for p in trainer.network.parameters())
    assert stored == {torch.bfloat16: torch.float32, torch.float8_e4m3fn: torch.float8_e4m3fn}
    rel = abs(losses[torch.float8_e4m3fn] - losses[torch.bfloat16]) / losses[torch.bfloat16]
    assert rel < 0.05, losses


def test_checkpointed_gradients_equal_plain_gradients_on_inplace_blocks(comfy):
    """ComfyUI's Flux blocks add to their residual streams in place; torch's non-reentrant checkpoint would then
    recompute from changed tensors. The LoRA gradients with checkpointing, and with block streaming, equal those
    without."""
    import comfy_tiny

    grads = {}
    for ckpt, stream in ((False, False), (True, False), (True, True)):
        trainer = _trainer(comfy_tiny.tiny_flux(), steps=1, gradient_checkpointing=ckpt, stream_blocks=stream)
        with torch.no_grad():  # a LoRA that is not zero, so that every layer's gradient is
            for p in trainer.network.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        with trainer.session():
            x0, cond, noise, sigma = trainer.sample_batch()
            trainer.loss(x0, cond, noise, sigma).backward()
        grads[ckpt, stream] = torch.cat([p.grad.flatten() for p in trainer.network.parameters()])
        if stream:  # the double and the single block, each fetched for its forward; the last still there after
            assert trainer.stream.fetches == 2 and trainer.stream.most_resident == 2
    assert grads[False, False].abs().max() > 0
    torch.testing.assert_close(grads[True, False], grads[False, False], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[True, True], grads[False, False], rtol=1e-4, atol=1e-6)


def test_compiled_training_matches_eager_on_comfys_flux(comfy):
    """torch.compile (LoraTrainConfig.compile) on ComfyUI's own Flux blocks, which add to their residual stream in
    place after a LayerNorm saved it: dynamo compiles them (not a silent eager run), the losses and the LoRA equal
    eager training's, and the session puts every forward back."""
    import comfy_tiny

    losses, loras = {}, {}
    for compiled in (False, True):
        torch._dynamo.reset()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        trainer = _trainer(comfy_tiny.tiny_flux(), steps=3, compile=compiled)
        bundle = trainer.run()
        if compiled:
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs >= 2
        losses[compiled] = torch.tensor(trainer.losses)
        loras[compiled] = torch.cat([t.flatten() for w in bundle.weights.values() for t in (w.up, w.down)])
        assert all("forward" not in vars(m) for m in trainer.model.denoiser.modules())
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)
    assert (loras[True] - loras[False]).norm() <= 1e-2 * loras[False].norm()


def test_conditioning_input_gives_the_rows_the_denoiser_takes(comfy):
    """A CONDITIONING (what any text encode node outputs) replaces CLIP + prompt: one entry for all images or one
    per image; its pooled vector becomes Flux's y; a wrong count names both numbers."""
    import comfy_tiny
    from idlora.nodes.comfy_adapter import ComfyDiffusion

    diffusion = ComfyDiffusion(comfy_tiny.tiny_flux(), load="none")
    c = comfy_tiny.tiny_flux_cond(2, 5)
    conditioning = [[c["context"][i:i + 1], {"pooled_output": c["y"][i:i + 1], "guidance": 3.5}] for i in range(2)]
    rows = diffusion.encode_conditioning(conditioning, 2, 64, 64)
    assert set(rows) == {"context", "y"}
    torch.testing.assert_close(rows["context"], c["context"])
    torch.testing.assert_close(rows["y"], c["y"])
    one = diffusion.encode_conditioning(conditioning[:1], 3, 64, 64)
    assert one["context"].shape == (3, 8, 32) and torch.equal(one["y"][2], c["y"][0])
    with pytest.raises(ValueError, match="conditioning has 2 entries but images has 3 images"):
        diffusion.encode_conditioning(conditioning, 3, 64, 64)


def test_every_x0_estimate_on_flux_is_comfys_calculate_denoised(comfy):
    """The identity/x0 trainer's x0 estimate, DuoLoRA's two-pass x0 and the progress preview's x0, on the tiny
    Flux, equal ComfyUI's own CONST algebra: noise_scaling for x_t, calculate_denoised for x0."""
    import comfy_tiny
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.duolora import LoraMerger, MergeConfig, MergeData
    from idlora.training.idstyle import X0LoraTrainer, X0TrainConfig
    from idlora.training.lora_trainer import TrainData

    patcher = comfy_tiny.tiny_flux()
    ms = patcher.model.model_sampling
    diffusion = ComfyDiffusion(patcher)
    cond = comfy_tiny.tiny_flux_cond(2, 1)
    x0, noise, sigma = _draws(3, n=2, shape=(16, 8, 8))

    # identity stylization's trainer (the identity loss decodes this x0)
    trainer = X0LoraTrainer(diffusion, TrainData(x0.clone(), cond), X0TrainConfig(steps=1, targets="flux_attn"))
    with torch.no_grad(), trainer.session():
        out, x0_hat = trainer.predict(x0, cond, noise, sigma)
        x_t = ms.noise_scaling(sigma, noise, x0)
        torch.testing.assert_close(x0_hat, ms.calculate_denoised(sigma, out, x_t), rtol=1e-5, atol=1e-5)

        # the preview: the x0 of the first latent at mid noise
        seen = []
        diffusion.preview = lambda latents: seen.append(latents) or latents[0, :3].movedim(0, -1)
        trainer.preview()
        s = diffusion.sigmas[len(diffusion.sigmas) // 2].reshape(1)
        g = torch.Generator().manual_seed(trainer.cfg.seed + 1)
        xt = ms.noise_scaling(s, torch.randn(x0[:1].shape, generator=g), x0[:1])
        torch.testing.assert_close(seen[0], ms.calculate_denoised(s, diffusion.net_forward(xt, s, {
            k: v[:1] for k, v in cond.items()}).float(), xt), rtol=1e-5, atol=1e-5)

    # DuoLoRA: denoise, re-noise with the same noise, denoise again (its cycle's reference)
    shapes = {n: m.weight.shape for n, m in diffusion.denoiser.named_modules() if n in trainer.network.names}
    g = torch.Generator().manual_seed(9)
    lora = lambda: {n: (torch.randn(2, s[1], generator=g) * 0.1, torch.randn(s[0], 2, generator=g) * 0.1, 2.0)
                    for n, s in shapes.items()}  # noqa: E731  (down, up, alpha) per module, as the merge node gives
    rows = {k: v[:1] for k, v in cond.items()}
    merger = LoraMerger(diffusion, MergeData(x0[:1], x0[1:], rows, rows, rows),
                        MergeConfig(method="ziprank", steps=1, targets="flux_attn"), lora(), lora())
    with torch.no_grad(), merger.session():
        x_t = ms.noise_scaling(sigma[:1], noise[:1], x0[:1])
        out = merger._single("c", x_t, sigma[:1], rows)
        again = ms.noise_scaling(sigma[:1], noise[:1], ms.calculate_denoised(sigma[:1], out, x_t))
        want = ms.calculate_denoised(sigma[:1], merger._single("c", again, sigma[:1], rows), again)
        torch.testing.assert_close(merger._two_pass("c", out, x_t, noise[:1], sigma[:1], rows), want,
                                   rtol=1e-5, atol=1e-5)
