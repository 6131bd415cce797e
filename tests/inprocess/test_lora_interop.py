"""The pack's LoRA files against the real peer: diffusers (+ peft) loads the SD1.x LoRAs IDLoRA saves, for every
target preset, and fuses them to the weights ComfyUI's stock loader patches; IDLoRA reads diffusers' alpha header.

The SD1.5-architecture U-Net is tiny (1.1 M params) but not one level deep: two levels (the lower one without
attention, as SD1.5's last), two res blocks per level, so that down/up-samplers, conv shortcuts and the index
arithmetic of the LDM <-> diffusers names all occur. diffusers gets the same weights through ComfyUI's map.
"""
from __future__ import annotations

import copy
import logging
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.comfy

UNET = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "in_channels": 4, "out_channels": 4, "use_temporal_resblock": False, "use_temporal_attention": False,
        "adm_in_channels": None, "model_channels": 32, "num_res_blocks": [2, 2], "channel_mult": [1, 2],
        "transformer_depth": [1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 0, 0, 0],  # popped from the end
        "transformer_depth_middle": 1, "context_dim": 64, "use_linear_in_transformer": False}
DIFFUSERS_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                      attention_head_dim=8, norm_num_groups=32)
RANK, ALPHA = 4, 6.0  # alpha != rank: the scale must come through


@pytest.fixture(scope="module")
def sd15(comfy):
    """patcher: the ComfyUI ModelPatcher; unet: a diffusers UNet2DConditionModel with the same weights; to_ldm:
    {diffusers key: ldm key} (ComfyUI's map); base: the ldm weights before any LoRA."""
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from diffusers import UNet2DConditionModel
    from seeded import fill_seeded_

    config = comfy.supported_models.SD15(dict(UNET))
    model = config.get_model({}, "")
    fill_seeded_(model.diffusion_model, 0, prefix="diffusion_model.")
    patcher = comfy.model_patcher.ModelPatcher(model.eval(), load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    ldm = model.diffusion_model.state_dict()
    to_ldm = {d: k for d, k in comfy.utils.unet_to_diffusers(config.unet_config).items() if k in ldm}
    unet = UNet2DConditionModel(**DIFFUSERS_UNET)
    unet.load_state_dict({d: ldm[k] for d, k in to_ldm.items()}, strict=True)
    return types.SimpleNamespace(patcher=patcher, unet=unet.eval(), to_ldm=to_ldm,
                                 base={k: v.detach().clone() for k, v in ldm.items()})


@pytest.fixture
def diffusers_warnings():
    """WARNING+ records of the diffusers and peft loggers (diffusers' root logger does not propagate)."""
    import diffusers.utils.logging as dlog
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [dlog._get_library_root_logger(), logging.getLogger("peft")]
    for lg in loggers:
        lg.addHandler(handler)
    yield records
    for lg in loggers:
        lg.removeHandler(handler)


def _random_lora(patcher, targets: str, seed: int = 0) -> dict:
    """Random non-zero LoRA weights (alpha != rank) for every module the target preset selects."""
    from idlora.models.lora import select_targets
    from idlora.training.lora_format import LoraWeight
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in select_targets(patcher.model.diffusion_model, targets).items():
        w = module.weight
        down = torch.randn((RANK, *w.shape[1:]), generator=g) * 0.1
        up = torch.randn((w.shape[0], RANK) + ((1, 1) if w.ndim == 4 else ()), generator=g) * 0.1
        out[name] = LoraWeight(down, up, ALPHA)
    return out


def _patched_weights(patched) -> dict[str, torch.Tensor]:
    """The U-Net weights (ldm keys) of a MODEL with LoRA patches, patched in, copied, unpatched again."""
    patched.patch_model()
    try:
        return {k: v.detach().clone() for k, v in patched.model.diffusion_model.state_dict().items()}
    finally:
        patched.unpatch_model()


def _stock_patched(patcher, path) -> dict[str, torch.Tensor]:
    """The U-Net weights after ComfyUI's stock LoRA loading (what LoraLoader calls: load_lora_for_models)."""
    import comfy.sd
    return _patched_weights(comfy.sd.load_lora_for_models(patcher, None, load_file(str(path)), 1.0, 0)[0])


def _diffusers_fused(unet, path) -> tuple[dict[str, torch.Tensor], int]:
    """diffusers' SD1.x LoRA loading of the file into a copy of ``unet``, fused: (weights, injected LoRA layers)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.tuners.lora import LoraLayer
    unet = copy.deepcopy(unet)
    path = Path(path)  # a folder and a weight_name, as users pass it (and as diffusers' offline mode requires)
    state_dict, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(path.parent), weight_name=path.name, return_lora_metadata=True, local_files_only=True)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, unet, adapter_name="idlora",
                                                       metadata=metadata)
    injected = sum(1 for m in unet.modules() if isinstance(m, LoraLayer) and "idlora" in m.lora_A)
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}, injected


def _assert_same_weights(model, fused, comfy_weights, changed: set[str]):
    """diffusers' fused weights == ComfyUI's patched weights, key by key, and exactly ``changed`` (ldm paths)
    differ from the base weights."""
    differ = [(d, (fused[d] - comfy_weights[k]).abs().max().item()) for d, k in model.to_ldm.items()
              if not torch.equal(fused[d], comfy_weights[k])
              and not torch.allclose(fused[d], comfy_weights[k], rtol=1e-5, atol=1e-6)]
    assert not differ, f"{len(differ)} weights differ, e.g. {differ[:3]}"
    moved = {k[:-len(".weight")] for k, v in comfy_weights.items() if not torch.equal(v, model.base[k])}
    assert moved == changed


@pytest.mark.parametrize("targets", ["attn", "attn_ff", "all_linear", "all_linear_conv"])
def test_diffusers_loads_the_packs_sd15_lora_like_the_stock_loader(sd15, tmp_path, targets, diffusers_warnings):
    from idlora.nodes.comfy_adapter import kohya_stems
    from idlora.training.lora_format import save_lora

    patcher = sd15.patcher
    weights = _random_lora(patcher, targets)
    stems = kohya_stems(patcher)
    path = save_lora(tmp_path / f"{targets}.safetensors", weights, {"idlora_base_model": "sd15"}, dtype=torch.float32,
                     stems=stems)
    with safe_open(path, "pt") as f:
        file_stems = {k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in f.keys()}
    assert file_stems == {stems[p] for p in weights}
    assert all(s.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_",
                             "lora_unet_time_embedding_", "lora_unet_conv_in", "lora_unet_conv_out"))
               for s in file_stems), sorted(file_stems)[:5]

    fused, injected = _diffusers_fused(sd15.unet, path)
    assert injected == len(weights), f"diffusers injected {injected} LoRA layers for {len(weights)} modules"
    assert not diffusers_warnings, [r.getMessage()[:300] for r in diffusers_warnings]
    _assert_same_weights(sd15, fused, _stock_patched(patcher, path), set(weights))


def test_trainer_bundles_save_kohya_sd15_stems_that_diffusers_loads(sd15, tmp_path, diffusers_warnings):
    """The real path: a LoRA trained on a ComfyUI SD1.5 MODEL carries the model's stems into its file."""
    from idlora.nodes.comfy_adapter import ComfyDiffusion, kohya_stems
    from idlora.training.lora_format import load_lora, save_lora
    from idlora.training.lora_trainer import LoraTrainConfig, LoraTrainer, TrainData

    patcher = sd15.patcher
    g = torch.Generator().manual_seed(1)
    data = TrainData(torch.randn(1, 4, 8, 8, generator=g), {"context": torch.randn(1, 77, 64, generator=g)})
    trainer = LoraTrainer(ComfyDiffusion(patcher, load="none"), data,  # "none": the fixture's model stays unpatched
                          LoraTrainConfig(steps=1, learning_rate=5e-2, rank=RANK, alpha=ALPHA, targets="attn"))
    bundle = trainer.run()
    assert bundle.stems == kohya_stems(patcher)
    path = save_lora(tmp_path / "trained.safetensors", bundle.weights, bundle.metadata, dtype=torch.float32,
                     stems=bundle.stems)
    assert all(k.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_"))
               for k in load_lora(path).weights)
    fused, injected = _diffusers_fused(sd15.unet, path)
    assert injected == len(bundle.weights) and not diffusers_warnings
    merged = {k: v + bundle.weights[k[:-len(".weight")]].delta(v.shape) if k[:-len(".weight")] in bundle.weights else v
              for k, v in sd15.base.items()}
    _assert_same_weights(sd15, fused, merged, set(bundle.weights))


def test_diffusers_alpha_metadata_is_applied_at_diffusers_strength(sd15, tmp_path):
    """A peft/diffusers LoRA whose alpha lives only in the lora_adapter_metadata header (lora_alpha 8, r 4, plus an
    alpha_pattern and a rank_pattern): IDLoRA applies it as diffusers fuses it, not at scale 1."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from idlora.nodes.comfy_adapter import apply_lora
    from idlora.training.lora_format import load_lora

    peft_unet = copy.deepcopy(sd15.unet)
    peft_unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     alpha_pattern={"attn1.to_v": 2}, rank_pattern={"attn2.to_k": 2}))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_unet.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(peft_unet),
        unet_lora_adapter_metadata=peft_unet.peft_config["default"].to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        assert not any(k.endswith(".alpha") for k in f.keys()) and "lora_adapter_metadata" in f.metadata()

    bundle = load_lora(path)
    scales = {(k.split("transformer_blocks.0.")[1], w.scale) for k, w in bundle.weights.items()}
    assert scales == {("attn1.to_q", 2.0), ("attn1.to_k", 2.0), ("attn1.to_v", 0.5), ("attn1.to_out.0", 2.0),
                      ("attn2.to_q", 2.0), ("attn2.to_k", 4.0), ("attn2.to_v", 2.0), ("attn2.to_out.0", 2.0)}

    fused, injected = _diffusers_fused(sd15.unet, path)
    assert injected == len(bundle.weights)
    ours, report = apply_lora(sd15.patcher, bundle, 1.0)
    assert report.ok
    _assert_same_weights(sd15, fused, _patched_weights(ours),
                         {sd15.to_ldm[k.removeprefix("unet.") + ".weight"][:-len(".weight")] for k in bundle.weights})


def test_old_sgm_stem_sd15_files_still_load_and_resolve(sd15, tmp_path):
    """Files written before (SGM stems on SD1.5) resolve onto the model, through ComfyUI's key table and without it,
    and IDLoRA Apply LoRA patches what the stock loader patches."""
    from idlora.nodes.comfy_adapter import ComfyDiffusion, apply_lora, diffusers_key_map, module_shapes
    from idlora.training.diffusion import lora_key_map
    from idlora.training.lora_format import kohya_stem, load_lora, resolve, save_lora

    patcher = sd15.patcher
    weights = _random_lora(patcher, "all_linear_conv", seed=4)
    old = save_lora(tmp_path / "old.safetensors", weights, dtype=torch.float32)  # no stems: SGM names
    new = save_lora(tmp_path / "new.safetensors", weights, dtype=torch.float32,
                    stems=ComfyDiffusion(patcher, load="none").lora_stems)
    assert set(load_lora(old).weights) == {kohya_stem(p) for p in weights}
    shapes = module_shapes(patcher)
    for path, key_maps in ((old, [None, diffusers_key_map(patcher)]),
                           (new, [lora_key_map(ComfyDiffusion(patcher, load="none")), diffusers_key_map(patcher)])):
        bundle = load_lora(path)
        for key_map in key_maps:
            resolved, report = resolve(bundle, shapes, key_map)
            assert report.ok and set(resolved) == set(weights), (path, report.summary())
            assert all(torch.equal(w.down, weights[p].down) and torch.equal(w.up, weights[p].up)
                       and w.alpha == weights[p].alpha for p, w in resolved.items())
    stock = _stock_patched(patcher, old)
    assert {k[:-len(".weight")] for k, v in stock.items() if not torch.equal(v, sd15.base[k])} == set(weights)
    mine = _patched_weights(apply_lora(patcher, load_lora(old), 1.0)[0])
    assert all(torch.equal(mine[k], v) or torch.allclose(mine[k], v, rtol=1e-5, atol=1e-6) for k, v in stock.items())


def _meta_patcher(arch: str):
    """A stand-in for a full-size ModelPatcher (U-Net on the meta device): what kohya_stems reads."""
    import comfy.supported_models
    import comfy_tiny
    from tiny_checkpoint import FULL_UNETS
    config = (comfy.supported_models.SD15 if arch == "sd15" else comfy.supported_models.SDXL)(dict(FULL_UNETS[arch]))
    return types.SimpleNamespace(model=types.SimpleNamespace(model_config=config,
                                                             diffusion_model=comfy_tiny.meta_unets()[arch]))


def test_full_sd15_stems_are_kohyas_and_sdxl_keeps_sgm_stems(comfy, tmp_path):
    from idlora.nodes.comfy_adapter import kohya_stems, module_shapes
    from idlora.training.lora_format import LoraWeight, kohya_stem, load_lora, save_lora

    sd15 = _meta_patcher("sd15")
    stems = kohya_stems(sd15)
    assert set(stems) == set(module_shapes(sd15)), "every Linear / Conv2d of SD1.5 gets a kohya stem"
    assert len(set(stems.values())) == len(stems)
    for path, stem in {
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q": "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "input_blocks.8.1.transformer_blocks.0.ff.net.0.proj": "down_blocks_2_attentions_1_transformer_blocks_0_ff_net_0_proj",
        "input_blocks.3.0.op": "down_blocks_0_downsamplers_0_conv",
        "input_blocks.11.0.out_layers.3": "down_blocks_3_resnets_1_conv2",
        "input_blocks.4.0.skip_connection": "down_blocks_1_resnets_0_conv_shortcut",
        "middle_block.1.proj_in": "mid_block_attentions_0_proj_in",
        "middle_block.2.emb_layers.1": "mid_block_resnets_1_time_emb_proj",
        "output_blocks.2.1.conv": "up_blocks_0_upsamplers_0_conv",
        "output_blocks.8.2.conv": "up_blocks_2_upsamplers_0_conv",
        "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0": "up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
        "output_blocks.11.0.in_layers.2": "up_blocks_3_resnets_2_conv1",
        "time_embed.0": "time_embedding_linear_1",
        "input_blocks.0.0": "conv_in",
        "out.2": "conv_out",
    }.items():
        assert stems[path] == "lora_unet_" + stem

    sdxl = _meta_patcher("sdxl")
    assert kohya_stems(sdxl) == {}, "kohya writes SDXL LoRAs with SGM stems"
    q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert q in module_shapes(sdxl)
    path = save_lora(tmp_path / "sdxl.safetensors", {q: LoraWeight(torch.ones(2, 640), torch.ones(640, 2), 1.0)},
                     stems=kohya_stems(sdxl))
    assert list(load_lora(path).weights) == [kohya_stem(q)] == ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
