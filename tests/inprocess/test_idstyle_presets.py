"""The block presets of identity stylization select what they document on the real SD1.5 and SDXL U-Nets
(ComfyUI's own UNetModel at full size, built on the meta device: names and shapes only, no memory)."""
from __future__ import annotations

import re

import pytest

from tiny_checkpoint import FULL_UNETS  # tools/

pytestmark = pytest.mark.comfy

FULL = FULL_UNETS


@pytest.fixture(scope="module")
def unets(comfy):
    import comfy_tiny
    return comfy_tiny.meta_unets()


def _targets(unet, pattern):
    from idlora.models.lora import select_targets
    return set(select_targets(unet, pattern))


@pytest.mark.parametrize("preset,family,content_blocks,style_blocks", [
    ("sd15_blora", "sd15", {"output_blocks.3.1"}, {"output_blocks.4.1"}),
    ("sd15_down_up", "sd15", {"input_blocks.1.1", "input_blocks.2.1", "input_blocks.4.1", "input_blocks.5.1",
                              "input_blocks.7.1", "input_blocks.8.1", "middle_block.1"},
     {f"output_blocks.{i}.1" for i in range(3, 12)}),
    ("sdxl_blora", "sdxl", {"output_blocks.0.1"}, {"output_blocks.1.1"}),
])
def test_presets_select_the_documented_blocks(unets, preset, family, content_blocks, style_blocks):
    from idlora.training.idstyle import BLOCK_PRESETS
    content, style, _ = BLOCK_PRESETS[preset]
    c, s = _targets(unets[family], content), _targets(unets[family], style)
    block = re.compile(r"^(input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+)")
    assert {block.match(n).group(1) for n in c} == content_blocks
    assert {block.match(n).group(1) for n in s} == style_blocks
    assert not c & s
    assert all(re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", n) for n in c | s)


def test_sdxl_blora_blocks_are_the_deep_ten_layer_transformers(unets):
    from idlora.training.idstyle import BLOCK_PRESETS
    content = _targets(unets["sdxl"], BLOCK_PRESETS["sdxl_blora"][0])
    assert len(content) == 10 * 2 * 4  # 10 transformer blocks x (attn1, attn2) x (q, k, v, out)


def test_flux_block_preset_fits_flux_and_is_refused_on_a_unet(comfy):
    """The 'flux_attn' blocks give both LoRAs the double blocks' attention and the single blocks' linear1/linear2 of
    the tiny Flux-dev; on an SD1.5 U-Net they are refused with the presets that fit, and 'attn' is refused on Flux."""
    import comfy_tiny
    from idlora.models.lora import LoraConfigError, select_targets
    from idlora.training.idstyle import BLOCK_PRESETS

    content, style, doc = BLOCK_PRESETS["flux_attn"]
    flux = comfy_tiny.tiny_patcher("flux").model.diffusion_model
    c = set(select_targets(flux, content))
    assert c == set(select_targets(flux, style))
    assert {n.split(".")[0] for n in c} == {"double_blocks", "single_blocks"} and "not a result" in doc
    with pytest.raises(LoraConfigError, match="flux_attn.*Flux.*U-Net|U-Net.*flux_attn"):
        select_targets(comfy_tiny.tiny_patcher("sd15").model.diffusion_model, content)
    with pytest.raises(LoraConfigError, match="'attn'.*flux_attn"):
        select_targets(flux, BLOCK_PRESETS["attn"][0])


def test_fitting_block_presets_per_family(comfy):
    """What the Identity Stylization node offers before it starts a job (it refuses the others, naming these)."""
    import comfy_tiny
    from idlora.training.idstyle import fitting_block_presets

    assert fitting_block_presets(comfy_tiny.tiny_patcher("flux").model.diffusion_model) == ["flux_attn"]
    sd15 = fitting_block_presets(comfy_tiny.tiny_patcher("sd15").model.diffusion_model)
    assert "attn" in sd15 and "flux_attn" not in sd15
