"""One way to read a config (models/config.py, training/config.py): for every config dataclass a stray key is an
error that names it and lists the known keys, tuples and nested configs come back from JSON, files and job folders
written by this and earlier versions load, the tools' flags are the configs' fields, and one training step (stage 1's
non-finite loss reports the scheduler's learning rate, as every trainer's does)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import build_lora_dataset  # tools/
import difflora_train  # tools/
import meta_lora_stage1  # tools/
from idlora.models.config import ConfigError
from idlora.models.dit import DiTConfig
from idlora.models.lae import LaeConfig
from idlora.training.config import TrainingInputError, from_flags
from idlora.training.difflora import (DiffLoraFileError, DiTTrainConfig, LaeTrainConfig, LaeTrainer, load_difflora,
                                      save_difflora)
from idlora.training.difflora_job import LaeTask
from idlora.training.duolora import MergeConfig
from idlora.training.identity_loss import IdentityConfig, IdentityConfigError
from idlora.training.idstyle import IdentityStyleConfig, X0TrainConfig
from idlora.training.lora_dataset import DatasetConfig
from idlora.training.lora_trainer import LoraTrainConfig, NonFiniteLossError
from idlora.training.lora_vector import LoraLayout
from idlora.training.meta_augment import AugmentConfig, AugmentConfigError
from idlora.training.meta_lora import MetaLoraStage1, MetaStage1Config, MetaStage2Config
from meta_lora_util import identity_set, stage1_cfg
from tiny_torch import TinyDiffusion

DIT = {"in_channels": 4, "tokens": 8, "face_dim": 16, "image_dim": 8}
# (config class, its required fields, the error type of its settings)
CONFIGS = [(LoraTrainConfig, {}, TrainingInputError), (MergeConfig, {}, TrainingInputError),
           (X0TrainConfig, {}, TrainingInputError), (MetaStage1Config, {}, TrainingInputError),
           (MetaStage2Config, {}, TrainingInputError), (IdentityConfig, {}, IdentityConfigError),
           (IdentityStyleConfig, {}, TrainingInputError), (DatasetConfig, {}, TrainingInputError),
           (LaeTrainConfig, {}, TrainingInputError), (DiTTrainConfig, {}, TrainingInputError),
           (AugmentConfig, {}, AugmentConfigError), (DiTConfig, DIT, ConfigError),
           (LaeConfig, {"length": 100}, ConfigError)]
IDS = [c.__name__ for c, _, _ in CONFIGS]


def json_round_trip(d: dict) -> dict:
    return json.loads(json.dumps(d))


@pytest.mark.parametrize("cls,required,error", CONFIGS, ids=IDS)
def test_a_stray_key_is_an_error_naming_it_and_the_known_keys(cls, required, error):
    with pytest.raises(error) as e:
        cls.from_dict({**required, "stray_key": 1})
    msg = str(e.value)
    assert "'stray_key'" in msg and "known:" in msg, msg
    assert all(f.name in msg.split("known:")[1] for f in fields(cls)), msg
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("cls,required,error", CONFIGS, ids=IDS)
def test_every_config_round_trips_through_json(cls, required, error):
    cfg = cls(**required)
    again = cls.from_dict(json_round_trip(asdict(cfg)))
    assert again == cfg and type(again) is cls


def test_tuples_are_rebuilt_from_lists():
    assert LoraTrainConfig.from_dict({"timestep_range": [0.25, 0.75]}).timestep_range == (0.25, 0.75)
    assert isinstance(IdentityConfig.from_dict({"timestep_range": [0, 0.5]}).timestep_range, tuple)
    assert MergeConfig.from_dict({"naive_weights": [0.5, 1.0]}).naive_weights == (0.5, 1.0)
    aug = AugmentConfig.from_dict({"ratios": [[16, 9], [1, 1]], "scales": [1.5, 2.0]})
    assert aug.ratios == ((16, 9), (1, 1)) and aug.scales == (1.5, 2.0)
    aug.validate()


def test_nested_configs_are_built_and_their_stray_keys_named():
    cfg = IdentityStyleConfig(content=X0TrainConfig(steps=7, timestep_range=(0.1, 0.9)), style_content_steps=0,
                              identity=IdentityConfig(weight=0.5, timestep_range=(0.0, 0.3)))
    again = IdentityStyleConfig.from_dict(json_round_trip(cfg.to_dict()))
    assert again == cfg and isinstance(again.content, X0TrainConfig) and isinstance(again.identity, IdentityConfig)
    assert again.content.timestep_range == (0.1, 0.9) and again.identity.timestep_range == (0.0, 0.3)
    d = json_round_trip(cfg.to_dict())
    d["identity"]["wieght"] = 1
    with pytest.raises(IdentityConfigError, match=r"'identity\.wieght'.*known:.*'weight'"):
        IdentityStyleConfig.from_dict(d)
    with pytest.raises(TrainingInputError, match="content must be a mapping"):
        IdentityStyleConfig.from_dict({"content": [1, 2]})


def test_a_missing_required_setting_is_named():
    with pytest.raises(ConfigError, match=r"lacks the required DiT settings \['tokens', 'face_dim', 'image_dim'\]"):
        DiTConfig.from_dict({"in_channels": 4})


# -- files and job folders ------------------------------------------------------------------------------------

def small_difflora(path: Path) -> Path:
    layout = LoraLayout.from_json(json.dumps([["a.to_q", 8, [2, 8], [8, 2], 2.0]]))
    lae = LaeTrainer(torch.randn(3, layout.length), LaeTrainConfig(steps=1, patch=4, levels=2, channels=8,
                                                                    heads=2, mlp_hidden=8)).module
    return Path(save_difflora(path, layout, lae))


def test_the_cached_demo_difflora_loads():
    """Written by tools/demo_models.py with this code's save_difflora (./idlora test points IDLORA_DEMO_MODELS at
    it): its LAE and DiT configs hold exactly the configs' fields."""
    path = Path(os.environ.get("IDLORA_DEMO_MODELS", "")) / "difflora" / "idlora_demo_random_difflora.safetensors"
    if not path.is_file():
        pytest.skip("no demo DiffLoRA (run the tests with ./idlora test)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert set(json.loads(meta["idlora_lae_config"])) == {f.name for f in fields(LaeConfig)}
    assert set(json.loads(meta["idlora_dit_config"])) == {f.name for f in fields(DiTConfig)}
    model = load_difflora(path)
    assert model.dit is not None and model.dit.cfg == DiTConfig.from_dict(json.loads(meta["idlora_dit_config"]))


def test_a_file_whose_config_has_a_stray_key_names_file_and_key(tmp_path):
    path = small_difflora(tmp_path / "lae.safetensors")
    assert load_difflora(path).lae.cfg.patch == 4
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["idlora_lae_config"] = json.dumps({**json.loads(meta["idlora_lae_config"]), "dropout": 0.1})
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(DiffLoraFileError, match=r"lae\.safetensors.*idlora_lae_config.*'dropout'.*known:"):
        load_difflora(path)


def test_a_job_config_with_a_stray_key_fails(tmp_path):
    config = {"train": asdict(LaeTrainConfig()), "dataset": str(tmp_path), "output_path": str(tmp_path / "o"),
              "name": "n", "identities": []}
    assert LaeTask.from_config(json_round_trip(config), tmp_path).cfg == LaeTrainConfig()
    config["train"]["lerning_rate"] = 1e-3
    with pytest.raises(TrainingInputError, match="'lerning_rate'.*known:.*'learning_rate'"):
        LaeTask.from_config(config, tmp_path)


# -- the tools' flags ------------------------------------------------------------------------------------------
# No tool reads a JSON config file (--config): their settings are flags made from the configs' fields.

def test_difflora_train_flags_are_the_config_fields():
    a = difflora_train.parse_args(["lae", "--dataset", "d", "--out", "o.safetensors"])
    assert difflora_train.train_config(a) == LaeTrainConfig()
    a = difflora_train.parse_args(["dit", "--dataset", "d", "--lae", "l", "--out", "o.safetensors", "--lr", "0.003",
                                   "--mlp-ratio", "2"])
    assert difflora_train.train_config(a) == DiTTrainConfig(learning_rate=0.003, mlp_ratio=2.0)


def test_meta_lora_stage1_flags_are_the_config_fields():
    base = ["--checkpoint", "c", "--data", "d", "--out", "o"]
    a = meta_lora_stage1.parse_args(base)
    assert meta_lora_stage1.stage1_config(a) == MetaStage1Config()  # --preset small: the config's defaults
    a = meta_lora_stage1.parse_args(base + ["--r2", "2", "--r1", "16", "--gradient-checkpointing"])
    cfg = meta_lora_stage1.stage1_config(a)
    assert (cfg.rank, cfg.r1, cfg.gradient_checkpointing) == (2, 16, True)
    assert all(hasattr(a, k) for k in meta_lora_stage1.RESUME_KEYS)  # the checkpoints' fingerprint keys
    a.log_every = 0
    with pytest.raises(meta_lora_stage1.InputError, match="--log-every = 0 is invalid: use N >= 1"):
        meta_lora_stage1.check_loop_args(a)


def test_build_lora_dataset_flags_are_the_config_fields():
    a = build_lora_dataset.parse_args(["--checkpoint", "c", "--data", "d", "--out", "o", "--clip-checkpoint", "x"])
    assert from_flags(DatasetConfig, a, build_lora_dataset.DATASET_FLAGS, trainer=a.trainer) == DatasetConfig()
    a = build_lora_dataset.parse_args(["--checkpoint", "c", "--data", "d", "--out", "o", "--clip-checkpoint", "x",
                                       "--res", "64", "--lr", "0.001"])
    cfg = from_flags(DatasetConfig, a, build_lora_dataset.DATASET_FLAGS, trainer=a.trainer)
    assert (cfg.resolution, cfg.learning_rate) == (64, 0.001)


# -- one training step ---------------------------------------------------------------------------------------------

def test_stage1_non_finite_loss_reports_the_schedulers_learning_rate():
    model = TinyDiffusion(seed=0)
    trainer = MetaLoraStage1(model, identity_set(model), stage1_cfg(warmup_steps=10))  # q_warmup 2 of 5
    real = trainer.loss
    trainer.loss = lambda *a: real(*a) * (float("nan") if trainer.step == 4 else 1.0)
    with trainer.session(), pytest.raises(NonFiniteLossError, match="at step 5") as e:
        for _ in range(5):
            trainer.train_step()
    lr = trainer.scheduler.get_last_lr()[0]
    assert lr == pytest.approx(3e-3 * 3 / 10)  # two Meta-Down steps (3 and 4) of the 10-step warm-up
    assert f"now {lr:g})" in str(e.value) and f"{trainer.cfg.learning_rate:g}" not in str(e.value)
