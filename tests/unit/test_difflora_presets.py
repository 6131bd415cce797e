"""DiffLoRA's presets where users pick settings: the config classmethods, the node rule (a widget the preset fixes
must keep its default) and tools/difflora_train.py --preset (flags given override the preset)."""
from __future__ import annotations

import pytest

import difflora_train  # tools/
from idlora.training.difflora import PRESETS, DiTTrainConfig, LaeTrainConfig
from idlora.training.lora_trainer import TrainingInputError


def test_presets_fix_the_papers_settings_and_small_is_the_default():
    assert PRESETS == ("small", "paper")
    assert LaeTrainConfig.preset() == LaeTrainConfig() and DiTTrainConfig.preset("small") == DiTTrainConfig()
    lae, dit = LaeTrainConfig.preset("paper"), DiTTrainConfig.preset("paper")
    assert (lae.learning_rate, lae.batch_size, lae.patch * 2 ** (lae.levels - 1) / lae.latent_channels) == (2e-5, 4,
                                                                                                         300)
    assert (dit.hidden, dit.depth, dit.heads, dit.learning_rate, dit.batch_size) == (1454, 16, 2, 1e-4, 32)
    assert LaeTrainConfig().learning_rate == 1e-3  # the small default: tens of LoRAs on a CPU
    assert DiTTrainConfig.preset("paper", steps=7, hidden=728).hidden == 728  # settings override the preset
    with pytest.raises(TrainingInputError, match=r"preset = 'large' is invalid: use one of \('small', 'paper'\)"):
        DiTTrainConfig.preset("large")


def test_node_widgets_must_not_contradict_the_preset():
    small = DiTTrainConfig()
    # widgets at their defaults (or at the paper's value) take the preset's values; the others apply
    cfg = DiTTrainConfig.from_widgets("paper", steps=9, learning_rate=small.learning_rate, hidden=small.hidden,
                                      depth=16, heads=small.heads, seed=3)
    assert (cfg.steps, cfg.seed, cfg.hidden, cfg.depth, cfg.heads) == (9, 3, 1454, 16, 2)
    # a changed widget of a preset setting is an error naming it, the preset's value and the fix
    with pytest.raises(TrainingInputError, match=r"preset 'paper' sets hidden = 1454, but the widget value hidden = "
                                                 r"512 differ: set preset 'small' .* reset hidden to 256"):
        DiTTrainConfig.from_widgets("paper", hidden=512, depth=small.depth)
    with pytest.raises(TrainingInputError, match=r"learning_rate = 2e-05, batch_size = 4, but the widget values "
                                                 r"learning_rate = 0.003, batch_size = 2 differ"):
        LaeTrainConfig.from_widgets("paper", learning_rate=3e-3, batch_size=2, steps=5)
    # preset small: the widgets as they are
    assert LaeTrainConfig.from_widgets("small", learning_rate=3e-3, patch=8).patch == 8


def test_cli_preset_paper_with_overrides(tmp_path):
    base = ["--dataset", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]
    cfg = difflora_train.train_config(difflora_train.parse_args(["dit", *base, "--lae", "l.safetensors",
                                                                 "--preset", "paper", "--steps", "5"]))
    assert cfg == DiTTrainConfig.preset("paper", steps=5)
    cfg = difflora_train.train_config(difflora_train.parse_args(["lae", *base, "--preset", "paper", "--patch", "19",
                                                                 "--latent-channels", "1"]))
    assert (cfg.patch, cfg.latent_channels, cfg.learning_rate, cfg.batch_size) == (19, 1, 2e-5, 4)
    assert difflora_train.train_config(difflora_train.parse_args(["lae", *base])) == LaeTrainConfig()
    with pytest.raises(SystemExit):
        difflora_train.parse_args(["lae", *base, "--preset", "huge"])
