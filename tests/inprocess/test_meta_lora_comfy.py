"""Meta-LoRA on ComfyUI's own tiny SD1.5 / SDXL U-Nets and tiny Flux-dev: stage 2 collapses exactly, so the stock
LoraLoader reproduces the three-factor forward (Meta-Down x Mid x Up) of the trainer."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    import folder_paths
    loras = tmp_path_factory.mktemp("meta_loras")
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    return loras


@pytest.mark.parametrize("arch,targets", [("sd15", "attn"), ("sd15", "all_linear_conv"), ("sdxl", "attn"),
                                          ("flux", "flux_attn")])
def test_collapsed_lora_through_stock_loader_equals_three_factor_forward(env, arch, targets):
    import comfy_tiny
    import nodes
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.lora_format import save_lora
    from idlora.training.meta_lora import (CropData, IdentitySet, MetaLoraPersonalizer, MetaLoraStage1,
                                           MetaStage1Config, MetaStage2Config, load_meta_down, save_meta_down)
    from comfy_tiny import tiny_cond as _cond, tiny_patcher as _patcher

    patcher = _patcher(arch)
    diffusion = ComfyDiffusion(patcher)
    g = torch.Generator().manual_seed(0)
    ch = 16 if arch == "flux" else 4  # latent channels
    cond = _cond(arch, patcher, 4, 1)
    ids = IdentitySet(["a", "b"], torch.randn(4, ch, 8, 8, generator=g), cond, torch.tensor([0, 0, 1, 1]))
    stage1 = MetaLoraStage1(diffusion, ids, MetaStage1Config(steps=4, r1=8, rank=2, batch_size=2, targets=targets,
                                                             identities_per_bucket=2, bucket_steps=2,
                                                             learning_rate=1e-2))
    stage1.run()
    save_meta_down(env / f"md_{arch}.safetensors", stage1.network, stage1.meta_down_metadata("md"))
    weights, meta = load_meta_down(env / f"md_{arch}.safetensors")
    crops = CropData([torch.randn(1, ch, 8, 8, generator=g), torch.randn(1, ch, 8, 16, generator=g)],
                     [_cond(arch, patcher, 1, 2), _cond(arch, patcher, 1, 3)])
    stage2 = MetaLoraPersonalizer(diffusion, crops, MetaStage2Config(steps=4, rank=2, learning_rate=5e-2),
                                  weights, meta)
    start = {k: v.detach().clone() for k, v in stage2.network.state_dict().items()}
    bundle = stage2.run()
    # stage 2 changes Mid and Up only: the Meta-Down is the file's, bit for bit
    for k, v in stage2.network.state_dict().items():
        assert torch.equal(v, start[k]) == k.startswith("meta_down."), k
    assert all(torch.equal(stage2.network.meta_down[k], weights[n])
               for n, k in zip(stage2.network.names, stage2.network.meta_down.keys()))
    name = f"meta_{arch}_{targets}.safetensors"
    save_lora(env / name, bundle.weights, bundle.metadata, dtype=torch.float32)

    sigma = torch.tensor([0.6 if arch == "flux" else 1.5])  # Flux's sigmas lie in (0, 1]
    x, c = torch.randn(1, ch, 8, 8, generator=g), _cond(arch, patcher, 1, 4)
    stage2.network.set_slots(torch.tensor([0]))
    with torch.no_grad(), stage2.network.attached():
        three = diffusion.net_forward(x, sigma, c)
    with torch.no_grad():
        base = diffusion.net_forward(x, sigma, c)
    assert (three - base).abs().max() > 1e-4, "the personalised adapter should change the output"
    (stock_model,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, name, 1.0)
    if arch == "flux":  # the same call the trainer makes (its guidance input included), on the stock-patched model
        stock = ComfyDiffusion(stock_model).net_forward(x, sigma, c)
    else:
        stock = comfy_tiny.diffusion_forward(stock_model, x, sigma, c["context"], c.get("y"))
    diff = (stock.float() - three.float()).abs().max()
    assert diff < 1e-4, f"max abs difference {diff:.3g}"
