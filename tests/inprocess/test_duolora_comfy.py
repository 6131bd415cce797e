"""DuoLoRA on ComfyUI's own U-Nets.

(a) Layer priors on the full-size SD1.5 and SDXL architectures (ComfyUI's UNetModel built on the meta device: the
    forward runs on meta tensors, only shapes propagate): which blocks are content- and style-dominant.
(b) The learnable-number counts of ZipRank and ZipLoRA on SDXL's attention layers (the paper's 0.07M and 1.33M).
(c) A merge exported with MergeNetwork.export and loaded by the stock LoraLoaderModelOnly gives the masked merge's
    forward, for ZipRank, ZipLoRA and the naive blend, on the tiny SD1.5, SDXL and Flux-dev models.
(d) On Flux no layer has a feature-map size: every layer is 'other' (no layer prior).
"""
from __future__ import annotations

import re

import pytest
import torch

from tiny_checkpoint import FULL_UNETS  # tools/

pytestmark = pytest.mark.comfy

# The full-size U-Nets (as in test_idstyle_presets.py): ComfyUI's detected configs of SD1.5 and SDXL base.
FULL = FULL_UNETS
LATENT = {"sdxl": 128, "sd15": 64}  # 1024 px and 512 px images
BLOCK = re.compile(r"^(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.")

# Feature-map side of each attention block, from the architecture (each level halves the side).
SDXL_SIZES = {"input_blocks.4": 64, "input_blocks.5": 64, "input_blocks.7": 32, "input_blocks.8": 32,
              "middle_block": 32, **{f"output_blocks.{i}": 32 for i in (0, 1, 2)},
              **{f"output_blocks.{i}": 64 for i in (3, 4, 5)}}
SD15_SIZES = {"input_blocks.1": 64, "input_blocks.2": 64, "input_blocks.4": 32, "input_blocks.5": 32,
              "input_blocks.7": 16, "input_blocks.8": 16, "middle_block": 8,
              **{f"output_blocks.{i}": 16 for i in (3, 4, 5)}, **{f"output_blocks.{i}": 32 for i in (6, 7, 8)},
              **{f"output_blocks.{i}": 64 for i in (9, 10, 11)}}


@pytest.fixture(scope="module")
def unets(comfy):
    import comfy_tiny
    return comfy_tiny.meta_unets()


def meta_forward(unet, arch: str, side: int, seen: dict | None = None):
    """A run_forward for classify_layers: the meta U-Net on a meta latent, timestep, text context (and SDXL's y).

    ComfyUI's default CPU attention (sub-quadratic) asks the device's allocator for free memory, which a meta tensor
    has not; ComfyUI's own override hook routes attention to torch's scaled_dot_product_attention, which meta tensors
    support. ``seen`` collects the input sizes of the SpatialTransformers (an independent measurement)."""
    import comfy.ldm.modules.attention as attention

    def run():
        handles = []
        if seen is not None:
            for n, m in unet.named_modules():
                if type(m).__name__ == "SpatialTransformer":
                    handles.append(m.register_forward_pre_hook(
                        lambda mod, args, n=n: seen.__setitem__(n, tuple(args[0].shape[-2:]))))
        x = torch.empty(1, 4, side, side, device="meta")
        ctx = torch.empty(1, 77, FULL[arch]["context_dim"], device="meta")
        y = torch.empty(1, FULL[arch]["adm_in_channels"], device="meta") if arch == "sdxl" else None
        over = {"optimized_attention_override": lambda func, *a, **kw: attention.attention_pytorch(*a, **kw)}
        try:
            out = unet(x, torch.empty(1, device="meta"), context=ctx, y=y, transformer_options=over)
        finally:
            for h in handles:
                h.remove()
        assert out.shape == (1, 4, side, side) and out.device.type == "meta"
    return run


def classified(unets, arch: str):
    from idlora.models.lora import select_targets
    from idlora.training.duolora import classify_layers
    unet, side = unets[arch], LATENT[arch]
    names = sorted(select_targets(unet, "attn"))
    seen: dict = {}
    kinds = classify_layers(unet, names, meta_forward(unet, arch, side, seen), (side, side))
    return names, kinds, seen


def by_block(kinds: dict) -> dict[str, set]:
    out: dict[str, set] = {}
    for n, (kind, hw) in kinds.items():
        out.setdefault(BLOCK.match(n).group(1), set()).add((kind, hw))
    return out


def check_cross_attention(unet, kinds: dict, seen: dict, context_dim: int) -> None:
    """attn2.to_k / to_v read the text tokens (their in_features is the context width), yet carry the size of
    their transformer, measured independently at the SpatialTransformer's input."""
    cross = [n for n in kinds if re.search(r"attn2\.to_[kv]$", n)]
    assert cross
    for n in cross:
        assert unet.get_submodule(n).in_features == context_dim
        transformer = re.match(r"^(.*?)\.transformer_blocks\.", n).group(1)
        assert kinds[n][1] == seen[transformer] == kinds[n.replace(".attn2.to_k", ".attn1.to_q")
                                                        .replace(".attn2.to_v", ".attn1.to_q")][1]


def test_sdxl_layer_priors_are_the_papers_blocks(unets):
    names, kinds, seen = classified(unets, "sdxl")
    assert len(names) == 560
    blocks = by_block(kinds)
    assert {b: {hw for _, hw in v} for b, v in blocks.items()} == {b: {(s, s)} for b, s in SDXL_SIZES.items()}
    content = {b for b, v in blocks.items() if v == {("content", (32, 32))}}
    style = {b for b, v in blocks.items() if v == {("style", (64, 64))}}
    # diffusers down_blocks.2, mid_block, up_blocks.0 at 32x32 of a 1024 px image: content-dominant
    assert content == {"input_blocks.7", "input_blocks.8", "middle_block", "output_blocks.0", "output_blocks.1",
                       "output_blocks.2"}
    # diffusers down_blocks.1, up_blocks.1 at 64x64: style-dominant
    assert style == {"input_blocks.4", "input_blocks.5", "output_blocks.3", "output_blocks.4", "output_blocks.5"}
    assert sum(k == "content" for k, _ in kinds.values()) == 480 and sum(k == "style" for k, _ in kinds.values()) == 80
    check_cross_attention(unets["sdxl"], kinds, seen, 2048)


def test_sd15_layer_classes_follow_the_measured_size(unets):
    names, kinds, seen = classified(unets, "sd15")
    assert len(names) == 128
    blocks = by_block(kinds)
    assert {b: {hw for _, hw in v} for b, v in blocks.items()} == {b: {(s, s)} for b, s in SD15_SIZES.items()}
    for n, (kind, hw) in kinds.items():
        assert kind == ("content" if hw[0] * 4 <= LATENT["sd15"] else "style"), n
    content = {b for b, v in blocks.items() if {k for k, _ in v} == {"content"}}
    assert content == {"input_blocks.7", "input_blocks.8", "middle_block", "output_blocks.3", "output_blocks.4",
                       "output_blocks.5"}  # 16x16 and 8x8 of a 64x64 latent
    check_cross_attention(unets["sd15"], kinds, seen, 768)


# -- (b) learnable numbers -------------------------------------------------------------------------

def meta_loras(modules: dict, rank: int) -> dict:
    return {n: (torch.empty(rank, m.in_features, device="meta"), torch.empty(m.out_features, rank, device="meta"),
                float(rank)) for n, m in modules.items()}


def test_sdxl_parameter_counts_of_ziprank_and_ziplora(unets):
    from idlora.models.lora import select_targets
    from idlora.models.merge import MergeNetwork
    from idlora.training.duolora import param_counts
    unet = unets["sdxl"]
    attn = select_targets(unet, "attn")
    assert len(attn) == 560
    lora = meta_loras(attn, 64)
    modules = dict(unet.named_modules())
    counts = {m: sum(p.numel() for p in MergeNetwork(modules, lora, meta_loras(attn, 64), m).mask_parameters())
              for m in ("ziprank", "ziplora", "naive")}
    assert counts == {"ziprank": 71_680, "ziplora": 1_331_200, "naive": 1_120}   # 2*64*560; 2*sum(d_out)
    shapes = {n: (m.out_features, m.in_features) for n, m in attn.items()}
    assert param_counts(shapes, 64) == {"ziprank": 71_680, "ziplora": 1_331_200, "naive": 0}  # naive: not learned
    assert round(counts["ziplora"] / counts["ziprank"]) == 19                   # "19x fewer" (Sec. 6)
    unequal = MergeNetwork(modules, lora, meta_loras(attn, 16), "ziprank")      # ZipRank: r_c + r_s per layer
    assert sum(p.numel() for p in unequal.mask_parameters()) == (64 + 16) * 560


# -- (c) export through the stock loader -----------------------------------------------------------

@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    import folder_paths
    loras = tmp_path_factory.mktemp("duolora_loras")
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    return loras


def random_lora(modules: dict, rank: int, alpha: float | None, g: torch.Generator) -> dict:
    out = {}
    for n, m in sorted(modules.items()):
        w = m.weight
        conv = w.ndim == 4
        fan_in = w[0].numel()
        down = torch.randn((rank, *w.shape[1:]) if conv else (rank, w.shape[1]), generator=g) / fan_in ** 0.5
        up = torch.randn((w.shape[0], rank, 1, 1) if conv else (w.shape[0], rank), generator=g) * 0.5 / rank ** 0.5
        out[n] = (down, up, alpha)
    return out


def random_masks(net, method: str, g: torch.Generator) -> dict:
    masks = {}
    for i, (n, layer) in enumerate(net.items()):
        if method == "naive":
            masks[n] = (torch.rand(1, generator=g) + 0.5, torch.rand(1, generator=g) + 0.5)
            continue
        pair = []
        for m in (layer.m_c, layer.m_s):
            v = torch.rand(m.shape, generator=g) * 2 - 0.5
            v[torch.rand(m.shape, generator=g) < 0.3] = 0.0            # exact zeros: pruned by ZipRank's export
            pair.append(v)
        if i == 1:
            pair = [torch.zeros_like(pair[0]), torch.zeros_like(pair[1])]  # a layer with nothing left
        masks[n] = tuple(pair)
    return masks


@pytest.mark.parametrize("method", ["ziprank", "ziplora", "naive"])
@pytest.mark.parametrize("arch,targets", [("sd15", "attn"), ("sd15", "all_linear_conv"), ("sdxl", "attn"),
                                          ("flux", "flux_attn")])
def test_export_through_stock_lora_loader_equals_masked_forward(env, arch, targets, method):
    import comfy_tiny
    import nodes
    from idlora.models.lora import select_targets
    from idlora.models.merge import MergeNetwork
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.lora_format import LoraWeight, save_lora

    patcher = comfy_tiny.tiny_patcher(arch)
    diffusion = ComfyDiffusion(patcher)
    g = torch.Generator().manual_seed(7)
    targets_ = select_targets(diffusion.denoiser, targets)
    if targets == "all_linear_conv":
        assert any(isinstance(m, torch.nn.Conv2d) for m in targets_.values())
    content = random_lora(targets_, 4, 2.0, g)
    # the style LoRA skips every fifth layer: there the merge stands in a zero LoRA
    style = random_lora({n: m for i, (n, m) in enumerate(sorted(targets_.items())) if i % 5}, 8, None, g)
    net = MergeNetwork(dict(diffusion.denoiser.named_modules()), content, style, method)
    masks = random_masks(net, method, g)
    net.set_masks(masks)

    flux = arch == "flux"
    x, sigma = torch.randn(1, 16 if flux else 4, 8, 8, generator=g), torch.tensor([0.6 if flux else 1.5])
    cond = comfy_tiny.tiny_cond(arch, patcher, 1, 4)
    with torch.no_grad():
        base = diffusion.net_forward(x, sigma, cond)
        with net.attached():
            merged = diffusion.net_forward(x, sigma, cond)
        net.set_masks({n: (torch.ones_like(l.m_c), torch.ones_like(l.m_s)) for n, l in net.items()})
        with net.attached():
            unmasked = diffusion.net_forward(x, sigma, cond)
        net.set_masks(masks)
    assert (merged - base).abs().max() > 1e-3, "the merge should change the output"
    assert (merged - unmasked).abs().max() > 1e-3, "the masks should matter"

    exported = net.export()
    for n, layer in net.items():
        mc, ms = masks[n]
        rank = layer.up_c.shape[1] + layer.up_s.shape[1]   # 4 + 8, or 4 + 1 where the style LoRA is missing
        expected = int((mc != 0).sum() + (ms != 0).sum()) if method == "ziprank" else rank
        assert (exported[n][0].shape[0] if n in exported else 0) == expected, n
    if method == "ziprank":
        empty = {n for n, (mc, ms) in masks.items() if not (mc.any() or ms.any())}
        assert net.names[1] in empty and set(exported) == set(net.names) - empty  # layers with nothing left dropped
    name = f"duo_{arch}_{targets}_{method}.safetensors"
    save_lora(env / name, {n: LoraWeight(d, u, a) for n, (d, u, a) in exported.items()}, {}, dtype=torch.float32)

    (stock_model,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, name, 1.0)
    assert set(stock_model.patches) == {f"diffusion_model.{n}.weight" for n in exported}  # every layer mapped
    if flux:  # the trainer's own call (with its guidance input) on the stock-patched model
        stock = ComfyDiffusion(stock_model).net_forward(x, sigma, cond)
    else:
        stock = comfy_tiny.diffusion_forward(stock_model, x, sigma, cond["context"], cond.get("y"))
    diff = (stock.float() - merged.float()).abs().max()
    assert diff < 1e-4, f"max abs difference {diff:.3g}"


def test_flux_layers_have_no_feature_map_size_so_no_layer_prior(comfy):
    """A DiT's blocks all work on the same tokens: no Flux layer is content- or style-dominant by the U-Net rule,
    every one is 'other' (prior masks all ones), not style-dominant because the latent entering the model is large."""
    import comfy_tiny
    from idlora.models.lora import select_targets
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.duolora import OTHER, classify_layers

    diffusion = ComfyDiffusion(comfy_tiny.tiny_patcher("flux"))
    names = sorted(select_targets(diffusion.denoiser, "flux_attn"))
    x, sigma, cond = torch.randn(1, 16, 8, 8), torch.tensor([0.5]), comfy_tiny.tiny_flux_cond(1, 0)
    kinds = classify_layers(diffusion.denoiser, names, lambda: diffusion.net_forward(x, sigma, cond), (8, 8))
    assert len(kinds) == len(names) >= 6
    assert all(kind == (OTHER, None) for kind in kinds.values())


def test_duolora_on_flux_classifies_every_layer_by_the_loras_weight_shares(comfy):
    """Without block patterns a DiT's layers, which have no feature-map size, are classified by the two LoRAs' weight
    shares: every Flux LoRA module is content or style (none 'other'), the one whose change is relatively larger
    wins, and the masks start from those priors."""
    import comfy_tiny
    from idlora.models.lora import select_targets
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.duolora import CONTENT, STYLE, LoraMerger, MergeConfig, MergeData

    diffusion = ComfyDiffusion(comfy_tiny.tiny_patcher("flux"))
    g = torch.Generator().manual_seed(5)
    targets = select_targets(diffusion.denoiser, "flux_attn")
    content, style = random_lora(targets, 4, None, g), random_lora(targets, 4, None, g)
    for n in targets:  # content concentrated in the double-stream blocks, style in the single-stream ones
        boosted = content if n.startswith("double_blocks.") else style
        boosted[n] = (boosted[n][0] * 4, *boosted[n][1:])
    cond = comfy_tiny.tiny_flux_cond(1, 0)
    data = MergeData(torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g), cond, cond, cond)
    cfg = MergeConfig(steps=1, cached_draws=1)
    merger = LoraMerger(diffusion, data, cfg, content, style)
    kinds = {n: k for n, (k, _) in merger.layer_kinds.items()}
    assert set(kinds) == set(targets) and len(targets) >= 6
    assert kinds == {n: CONTENT if n.startswith("double_blocks.") else STYLE for n in targets}
    for n, layer in merger.network.items():
        share = float((layer.m_c != 0).float().mean())
        assert share == pytest.approx(cfg.t_content if kinds[n] == CONTENT else cfg.t_style, abs=0.13), n


FLUX_CONTENT, FLUX_STYLE = r"^double_blocks\.", r"^single_blocks\."


def test_duolora_on_flux_takes_its_layer_priors_from_block_patterns(comfy):
    """On a DiT the user's content_blocks / style_blocks classify every merged layer (none left 'other' with these
    patterns), the DuoLoRA merge starts from those prior masks and trains; patterns that match nothing are refused."""
    import comfy_tiny
    from idlora.models.lora import select_targets
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.duolora import CONTENT, STYLE, LoraMerger, MergeConfig, MergeData
    from idlora.training.lora_trainer import TrainingInputError

    diffusion = ComfyDiffusion(comfy_tiny.tiny_patcher("flux"))
    g = torch.Generator().manual_seed(3)
    targets = select_targets(diffusion.denoiser, "flux_attn")
    content, style = random_lora(targets, 4, None, g), random_lora(targets, 4, None, g)
    cond = comfy_tiny.tiny_flux_cond(1, 0)
    data = MergeData(torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g), cond, cond, cond)
    cfg = MergeConfig(steps=2, cached_draws=1, content_blocks=FLUX_CONTENT, style_blocks=FLUX_STYLE)
    merger = LoraMerger(diffusion, data, cfg, content, style)
    kinds = {n: k for n, (k, _) in merger.layer_kinds.items()}
    assert set(kinds) == set(targets)
    assert {n for n, k in kinds.items() if k == CONTENT} == {n for n in targets if n.startswith("double_blocks.")}
    assert {n for n, k in kinds.items() if k == STYLE} == {n for n in targets if n.startswith("single_blocks.")}
    # prior-informed init: content layers keep t_content of m_c, style layers t_style of it
    for n, layer in merger.network.items():
        share = float((layer.m_c != 0).float().mean())
        assert share == pytest.approx(cfg.t_content if kinds[n] == CONTENT else cfg.t_style, abs=0.13), n
    merger.run()
    assert len(merger.losses) == 2 and all(torch.isfinite(torch.tensor(merger.losses)))
    with pytest.raises(TrainingInputError, match="match none of the"):
        LoraMerger(diffusion, data, MergeConfig(steps=1, content_blocks="^nothing", style_blocks="^neither"),
                   content, style)
