"""In-process ComfyUI: the pack's LoRA through the stock LoraLoader, and every key style through
IDLoRA Apply LoRA, on tiny SD1.5 and SDXL U-Nets built from ComfyUI's own model classes."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    import folder_paths
    loras = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    return loras


def _cond(arch: str, patcher, n: int, seed: int):
    import comfy_tiny
    return comfy_tiny.tiny_cond(arch, patcher, n, seed)


def _patcher(arch: str):
    import comfy_tiny
    return comfy_tiny.tiny_patcher(arch)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("targets", ["attn", "all_linear_conv"])
def test_stock_lora_loader_reproduces_trainer_forward(env, arch, targets):
    """Train with the pack, save, load with the stock LoraLoaderModelOnly: same denoiser output."""
    import comfy_tiny
    import nodes
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.lora_format import save_lora
    from idlora.training.lora_trainer import LoraTrainConfig, LoraTrainer, TrainData

    patcher = _patcher(arch)
    diffusion = ComfyDiffusion(patcher)
    assert diffusion.prediction_type == "eps" and diffusion.name == arch
    data = TrainData(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), _cond(arch, patcher, 2, 1))
    trainer = LoraTrainer(diffusion, data, LoraTrainConfig(steps=4, learning_rate=5e-2, rank=4, alpha=2.0,
                                                           targets=targets))
    bundle = trainer.run()
    name = f"pack_{arch}_{targets}.safetensors"
    save_lora(env / name, bundle.weights, bundle.metadata, dtype=torch.float32)

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([1.5])
    cond = _cond(arch, patcher, 1, 3)
    with torch.no_grad(), trainer.network.attached():
        ours = diffusion.net_forward(x, sigma, cond)
    with torch.no_grad():
        base = diffusion.net_forward(x, sigma, cond)
    assert (ours - base).abs().max() > 1e-3, "the trained LoRA should change the output"

    (stock_model,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, name, 1.0)
    stock = comfy_tiny.diffusion_forward(stock_model, x, sigma, cond["context"], cond.get("y"))
    torch.testing.assert_close(stock.float(), ours.float(), rtol=1e-4, atol=1e-4)


def _random_lora(patcher, n_modules: int = 6, rank: int = 3, seed: int = 0):
    """Random LoRA weights for some attention and one conv module of the model, by ldm path."""
    sd = patcher.model.diffusion_model.state_dict()
    paths = [k[:-7] for k in sd if k.endswith(".weight") and sd[k].ndim >= 2]
    chosen = [p for p in paths if ".attn" in p][:n_modules - 1] + [p for p in paths if sd[p + ".weight"].ndim == 4][:1]
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in chosen:
        w = sd[p + ".weight"]
        down_shape = (rank, *w.shape[1:]) if w.ndim == 4 else (rank, w.shape[1])
        up_shape = (w.shape[0], rank, 1, 1) if w.ndim == 4 else (w.shape[0], rank)
        out[p] = (torch.randn(down_shape, generator=g) * 0.2, torch.randn(up_shape, generator=g) * 0.2)
    return out


def _ldm_to_diffusers(patcher) -> dict[str, str]:
    import comfy.utils
    m = comfy.utils.unet_to_diffusers(patcher.model.model_config.unet_config)
    return {v[:-7]: k[:-7] for k, v in m.items() if k.endswith(".weight")}


def _write(style: str, path, lora, patcher, alpha: float | None):
    to_diff = _ldm_to_diffusers(patcher)
    sd = {}
    for p, (down, up) in lora.items():
        if style == "comfy":
            stem, dn, un = f"diffusion_model.{p}", "lora_down.weight", "lora_up.weight"
        elif style == "kohya_diffusers":
            stem, dn, un = "lora_unet_" + to_diff[p].replace(".", "_"), "lora_down.weight", "lora_up.weight"
        elif style == "peft_processor":  # the diffusers LoRA spelling ComfyUI's stock loader knows
            d = to_diff[p].replace(".to_", ".processor.to_")
            stem, dn, un = "unet." + (d[:-2] if d.endswith(".to_out.0") else d), "lora_A.weight", "lora_B.weight"
        else:  # peft: plain module names, lora_A/lora_B
            stem, dn, un = "unet." + to_diff[p], "lora_A.weight", "lora_B.weight"
        sd[f"{stem}.{dn}"], sd[f"{stem}.{un}"] = down.contiguous(), up.contiguous()
        if alpha is not None:
            sd[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))


def _hand_merged_forward(patcher, lora, alpha, x, sigma, ctx):
    import comfy_tiny
    clone = patcher.clone()
    patches = {}
    for p, (down, up) in lora.items():
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        w = clone.model.diffusion_model.get_submodule(p).weight
        patches[f"diffusion_model.{p}.weight"] = ("diff", ((scale * (up.flatten(1) @ down.flatten(1))).reshape(w.shape),))
    clone.add_patches(patches, 1.0)
    return comfy_tiny.diffusion_forward(clone, x, sigma, ctx)


@pytest.mark.parametrize("style,alpha", [("comfy", None), ("comfy", 1.5), ("kohya_diffusers", 6.0),
                                         ("peft_processor", None), ("peft", None)])
def test_key_styles_apply_like_stock_and_like_hand_merge(env, style, alpha):
    import comfy_tiny
    import nodes
    from idlora.nodes.lora_nodes import ApplyLoRA, LoadLoRA

    patcher = comfy_tiny.tiny_sd15(seed=0)
    lora = _random_lora(patcher)
    name = f"style_{style}_{alpha}.safetensors"
    _write(style, env / name, lora, patcher, alpha)
    x, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([2.0])
    ctx = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(6))

    bundle = LoadLoRA.execute(name).args[0]
    ours_model = ApplyLoRA.execute(patcher, 1.0, lora=bundle).args[0]
    ours = comfy_tiny.diffusion_forward(ours_model, x, sigma, ctx)
    expected = _hand_merged_forward(patcher, lora, alpha, x, sigma, ctx)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    base = comfy_tiny.diffusion_forward(patcher, x, sigma, ctx)
    assert (ours - base).abs().max() > 1e-3

    if style != "peft":  # plain peft attention names are not in ComfyUI 0.3.75's stock key table
        (stock_model,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, name, 1.0)
        stock = comfy_tiny.diffusion_forward(stock_model, x, sigma, ctx)
        torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)


def test_apply_rejects_other_architecture(env):
    import comfy_tiny
    from idlora.nodes.lora_nodes import ApplyLoRA
    from idlora.training.lora_format import LoraFormatError, LoraWeight, LoraBundle

    sd15 = comfy_tiny.tiny_sd15(seed=0)
    lora = _random_lora(sd15, n_modules=6)
    # a wider model's layers under the same names (as SDXL vs SD1.5), plus names this model lacks
    weights = {p: LoraWeight(torch.cat([d, d], 1), torch.cat([u, u], 0), None) for p, (d, u) in list(lora.items())[:3]}
    weights.update({f"output_blocks.9.1.transformer_blocks.{i}.attn1.to_q": LoraWeight(torch.ones(2, 8), torch.ones(8, 2))
                    for i in range(2)})
    weights.update({p: LoraWeight(d, u, None) for p, (d, u) in list(lora.items())[3:4]})
    bundle = LoraBundle(weights, {"idlora_base_model": "sdxl"})
    with pytest.raises(LoraFormatError, match=r"does not fit the model: 1 of 6 LoRA modules match.*sdxl"):
        ApplyLoRA.execute(sd15, 1.0, lora=bundle)


def test_apply_does_not_mutate_input_model(env):
    import comfy_tiny
    from idlora.nodes.lora_nodes import ApplyLoRA
    from idlora.training.lora_format import LoraBundle, LoraWeight

    patcher = comfy_tiny.tiny_sd15(seed=0)
    lora = _random_lora(patcher)
    bundle = LoraBundle({p: LoraWeight(d, u, None) for p, (d, u) in lora.items()})
    x, sigma, ctx = torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 77, 64)
    before = comfy_tiny.diffusion_forward(patcher, x, sigma, ctx)
    patched = ApplyLoRA.execute(patcher, 0.7, lora=bundle).args[0]
    comfy_tiny.diffusion_forward(patched, x, sigma, ctx)
    assert not patcher.patches and patched.patches
    torch.testing.assert_close(comfy_tiny.diffusion_forward(patcher, x, sigma, ctx), before)


def _saved_numel(diffusion, data, cfg) -> tuple[int, list[float]]:
    """Elements autograd saves for the backward pass during one training step, and the step's loss."""
    from idlora.training.lora_trainer import LoraTrainer
    trainer = LoraTrainer(diffusion, data, cfg)
    saved = [0]

    def pack(t):
        saved[0] += t.numel()
        return t
    with trainer.session(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.train_step()
    return saved[0], [loss] + [w.float().sum().item() for w in trainer.network.parameters()]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_gradient_checkpointing_saves_activations_and_keeps_results(env, arch):
    """Checkpointing must really happen on ComfyUI's U-Net (which walks its blocks' layers itself)."""
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.lora_trainer import LoraTrainConfig, TrainData, checkpointed_blocks

    patcher = _patcher(arch)
    diffusion = ComfyDiffusion(patcher)
    data = TrainData(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), _cond(arch, patcher, 1, 1))
    base = dict(steps=1, learning_rate=1e-2, rank=4, targets="attn")
    plain, r1 = _saved_numel(diffusion, data, LoraTrainConfig(**base))
    ckpt, r2 = _saved_numel(diffusion, data, LoraTrainConfig(**base, gradient_checkpointing=True))
    with checkpointed_blocks(diffusion.denoiser) as n:
        assert n >= 6
    assert ckpt < 0.6 * plain, (ckpt, plain)
    torch.testing.assert_close(torch.tensor(r2), torch.tensor(r1), rtol=1e-5, atol=1e-6)
