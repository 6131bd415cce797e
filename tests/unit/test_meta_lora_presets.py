"""Meta-LoRA stage 1's `paper` preset: the config, the command line (--preset paper) and the node's widget rule all
give the paper's numbers (q_total 50,000, q_bucket 2,500, q_warm-up 1,000, 50 identities per bucket, lr 4e-4, batch
4, r1 128, r2 1); the small default stays the CPU one; a widget that contradicts the preset is an error naming it."""
from __future__ import annotations

import pytest

import meta_lora_stage1  # tools/
from idlora.training.config import TrainingInputError
from idlora.training.meta_lora import STAGE1_PRESETS, MetaLoraStage1, MetaStage1Config
from meta_lora_util import identity_set
from tiny_torch import TinyDiffusion

PAPER = dict(steps=50000, bucket_steps=2500, identities_per_bucket=50, warmup_fraction=0.4, learning_rate=4e-4,
             batch_size=4, r1=128, rank=1)
BASE = ["--checkpoint", "c", "--data", "d", "--out", "o"]


def test_paper_preset_is_the_papers_numbers():
    assert STAGE1_PRESETS == ("small", "paper")
    cfg = MetaStage1Config.preset("paper")
    assert {k: getattr(cfg, k) for k in PAPER} == PAPER
    assert round(cfg.warmup_fraction * cfg.bucket_steps) == 1000  # q_warm-up (App. B.1)
    # 50 identities x 20 images, each used 10 times, batch 4: q_bucket = 2,500 (Sec. 3)
    assert cfg.uses_per_image * cfg.identities_per_bucket * 20 / cfg.batch_size == cfg.bucket_steps
    small = MetaStage1Config.preset("small")
    assert small == MetaStage1Config() and (small.steps, small.identities_per_bucket, small.bucket_steps) == (2000, 8, 0)
    with pytest.raises(TrainingInputError, match=r"preset = 'huge' is invalid: use one of \('small', 'paper'\)"):
        MetaStage1Config.preset("huge")


def test_paper_preset_drives_the_trainer_buckets():
    """q_bucket and q_warmup of the trainer come from the preset (a tiny model; settings the preset does not fix, such
    as targets, stay settable)."""
    model = TinyDiffusion()
    cfg = MetaStage1Config.preset("paper", r1=8, targets="attn")
    trainer = MetaLoraStage1(model, identity_set(model), cfg)
    assert (trainer.q_bucket, trainer.q_warmup) == (2500, 1000)
    assert trainer.network.n_slots == 5  # min(50 identities per bucket, the 5 identities there are)


def test_command_line_preset():
    cfg = meta_lora_stage1.stage1_config(meta_lora_stage1.parse_args(BASE + ["--preset", "paper"]))
    assert {k: getattr(cfg, k) for k in PAPER} == PAPER
    a = meta_lora_stage1.parse_args(BASE + ["--preset", "paper", "--steps", "100", "--r1", "64"])
    cfg = meta_lora_stage1.stage1_config(a)
    assert (cfg.steps, cfg.r1, cfg.bucket_steps) == (100, 64, 2500)  # flags given override the preset
    assert (a.steps, a.r1, a.identities_per_bucket) == (100, 64, 50)  # resolved into the resume fingerprint
    assert meta_lora_stage1.stage1_config(meta_lora_stage1.parse_args(BASE)) == MetaStage1Config()
    with pytest.raises(SystemExit):
        meta_lora_stage1.parse_args(BASE + ["--preset", "huge"])


def test_node_widgets_with_the_paper_preset():
    """The node's rule (MetaStage1Config.from_widgets): widgets at their defaults take the preset's values; a widget
    of a setting the preset fixes, set to something else, is an error naming it and the fix."""
    defaults = dict(steps=2000, learning_rate=4e-4, rank=1, r1=128, batch_size=4, identities_per_bucket=8,
                    bucket_steps=0, warmup_fraction=0.4)
    cfg = MetaStage1Config.from_widgets("paper", targets="attn", seed=3, **defaults)
    assert {k: getattr(cfg, k) for k in PAPER} == PAPER and cfg.seed == 3
    assert MetaStage1Config.from_widgets("small", **defaults) == MetaStage1Config()
    with pytest.raises(TrainingInputError, match=r"preset 'paper' sets steps = 50000, but the widget value steps = 12 "
                                                 r"differ.*reset steps to 2000"):
        MetaStage1Config.from_widgets("paper", **{**defaults, "steps": 12})
