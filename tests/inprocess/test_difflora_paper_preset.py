"""DiffLoRA's `paper` preset builds the networks of the paper (Sec. 4.1) for the full SDXL `attn` LoRA layout: an LAE
of about 300x compression and a DiT of 16 blocks of width 1454. Everything is built on the meta device (ComfyUI's
own full-size UNetModel for the layout, the LAE and the DiT: shapes and parameter counts, no memory)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy

PAPER_COMPRESSION, TOLERANCE = 300.0, 0.01  # "nearly 300 times"; within 1% (the padding of L costs < 0.1% here)


@pytest.fixture(scope="module")
def unets(comfy):
    import comfy_tiny
    return comfy_tiny.meta_unets()


def attn_layout(unet, rank: int):
    """The LoraLayout of a rank-``rank`` LoRA on the U-Net's `attn` targets (meta-device factors)."""
    from idlora.models.lora import select_targets
    from idlora.training.lora_format import LoraWeight
    from idlora.training.lora_vector import LoraLayout
    return LoraLayout.of({n: LoraWeight(torch.empty(rank, m.weight.shape[1], device="meta"),
                                        torch.empty(m.weight.shape[0], rank, device="meta"), float(rank))
                          for n, m in select_targets(unet, "attn").items()})


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(preset: str, length: int, face_dim: int = 512, image_dim: int = 768):
    """The preset's LAE for LoRAs of ``length`` numbers and its DiT over that LAE's latents, on the meta device."""
    from idlora.models.dit import DiTConfig, LoraDiT
    from idlora.models.lae import LoraAutoencoder
    from idlora.training.difflora import DiTTrainConfig, LaeTrainConfig
    lae_cfg = LaeTrainConfig.preset(preset).lae_config(length)
    t = DiTTrainConfig.preset(preset)
    channels, tokens = lae_cfg.latent_shape
    with torch.device("meta"):
        lae = LoraAutoencoder(lae_cfg)
        dit = LoraDiT(DiTConfig(channels, tokens, face_dim, image_dim, t.hidden, t.depth, t.heads, t.mlp_ratio))
    return lae, dit


def dit_block_params(h: int, mlp_ratio: float = 4.0) -> int:
    """One adaLN-Zero block of width h: qkv (3h x h + 3h), proj (h x h + h), MLP (m x h + m, h x m + h) with
    m = mlp_ratio x h, and the modulation (6h x h + 6h)."""
    m = int(h * mlp_ratio)
    return (3 * h * h + 3 * h) + (h * h + h) + (m * h + m) + (h * m + h) + (6 * h * h + 6 * h)


@pytest.mark.parametrize("family,rank", [("sdxl", 4), ("sdxl", 1), ("sd15", 4)])
def test_paper_preset_builds_the_paper_size_lae_and_dit(unets, family, rank):
    from idlora.training.difflora import DiTTrainConfig, LaeTrainConfig
    layout = attn_layout(unets[family], rank)
    lae, dit = build("paper", layout.length)

    # LAE: ~300x, measured on the shapes its encoder really gives (meta tensors), not only the config's formula
    z = lae.encode(torch.empty(1, layout.length, device="meta"))
    assert tuple(z.shape[1:]) == lae.cfg.latent_shape
    assert tuple(lae.decode(z).shape) == (1, layout.length)
    ratio = layout.length / z[0].numel()
    assert abs(ratio / PAPER_COMPRESSION - 1) < TOLERANCE, (family, rank, layout.length, tuple(z.shape), ratio)
    assert lae.cfg.levels == 5  # "a 5-layer 1D convolutional encoder"

    # DiT: 16 blocks of width 1454, every block the full adaLN-Zero block of that width
    assert dit.cfg.depth == 16 and dit.cfg.hidden == 1454 and len(dit.blocks) == 16
    assert dit.cfg.hidden % dit.cfg.heads == 0
    for block in dit.blocks:
        assert block.qkv.in_features == 1454 and block.mlp[0].out_features == 4 * 1454
        assert count(block) == dit_block_params(1454)
    blocks = 16 * dit_block_params(1454)
    assert blocks <= count(dit) < blocks * 1.05  # the rest: token / timestep embeddings, MIF, output layer
    x = torch.empty(2, *lae.cfg.latent_shape, device="meta")
    cond = dit.condition(torch.empty(2, 512, device="meta"), torch.empty(2, 768, device="meta"))
    assert dit(x, torch.zeros(2, dtype=torch.long, device="meta"), cond).shape == x.shape

    # the paper's optimiser settings
    lae_t, dit_t = LaeTrainConfig.preset("paper"), DiTTrainConfig.preset("paper")
    assert (lae_t.learning_rate, lae_t.batch_size) == (2e-5, 4)
    assert (dit_t.learning_rate, dit_t.batch_size) == (1e-4, 32)
    assert (dit_t.timesteps, dit_t.beta_start, dit_t.beta_end) == (1000, 1e-4, 0.012)
    print(f"{family} attn rank {rank}: L = {layout.length:,}, latent {tuple(z.shape[1:])}, {ratio:.2f}x; LAE "
          f"{count(lae) / 1e6:.2f} M params, DiT {count(dit) / 1e6:.1f} M params over {lae.cfg.latent_shape[1]} "
          f"tokens")


def test_small_preset_stays_the_cpu_default(unets):
    """The small preset is the dataclass defaults (a 6 x 256 DiT, 64x LAE): the paper's sizes come only with the
    preset."""
    from idlora.training.difflora import DiTTrainConfig, LaeTrainConfig
    assert LaeTrainConfig.preset("small") == LaeTrainConfig() and DiTTrainConfig.preset("small") == DiTTrainConfig()
    layout = attn_layout(unets["sdxl"], 4)
    lae, dit = build("small", layout.length)
    assert abs(lae.cfg.compression / 64 - 1) < TOLERANCE
    assert (dit.cfg.depth, dit.cfg.hidden) == (6, 256)
    assert count(dit) < count(build("paper", layout.length)[1]) / 50


def test_training_nodes_offer_the_preset_and_refuse_a_contradicting_widget(comfy):
    """The LAE and DiT nodes: a `preset` combo (default small), widget defaults from the configs (the LAE's lr too,
    with the paper's value in its tooltip), and a widget the paper preset fixes, changed, is an error before any
    waiting or file access."""
    from idlora.nodes.difflora_nodes import TrainDiffLora, TrainLoraAutoencoder
    from idlora.training.difflora import DiTTrainConfig, LaeTrainConfig
    from idlora.training.lora_trainer import TrainingInputError
    for node, cls in ((TrainLoraAutoencoder, LaeTrainConfig), (TrainDiffLora, DiTTrainConfig)):
        inputs = {i.id: i for i in node.define_schema().inputs}
        assert inputs["preset"].options == ["small", "paper"] and inputs["preset"].default == "small"
        for name in ("steps", "learning_rate", "batch_size"):
            assert inputs[name].default == getattr(cls(), name), (node, name)
    lr = {i.id: i for i in TrainLoraAutoencoder.define_schema().inputs}["learning_rate"]
    assert "2e-5" in lr.tooltip and lr.default == 1e-3
    with pytest.raises(TrainingInputError, match=r"preset 'paper' sets hidden = 1454, but the widget value hidden = 64"):
        TrainDiffLora.execute("no_such_dataset", "none", 5, 1e-4, 32, 64, 6, 4, 0, "x", preset="paper")
    with pytest.raises(TrainingInputError, match=r"preset 'paper' sets patch = 75, but the widget value patch = 8"):
        TrainLoraAutoencoder.execute("no_such_dataset", 5, 1e-3, 4, 1.0, 8, 5, 64, 4, 0, "x", preset="paper")
    # the paper preset with default widgets gets past the settings to the dataset check
    with pytest.raises(FileNotFoundError, match="no_such_dataset does not exist"):
        TrainLoraAutoencoder.execute("no_such_dataset", 5, 1e-3, 4, 1.0, 16, 5, 64, 4, 0, "x", preset="paper")
