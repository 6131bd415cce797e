"""Shared data of the Meta-LoRA tests: a few tiny identities, and a stage-1 configuration that runs in seconds."""
from __future__ import annotations

import torch

from idlora.training.lora_trainer import prepare_data
from idlora.training.meta_lora import CropData, IdentitySet, MetaStage1Config, identity_prompts
from tiny_torch import images

N_IDS, PER_ID = 5, 3


def identity_set(model, n_ids=N_IDS, per_id=PER_ID) -> IdentitySet:
    imgs = torch.cat([images(per_id, seed=10 + i) * 0.5 + 0.5 * (i / n_ids) for i in range(n_ids)])
    data = prepare_data(model, imgs, identity_prompts("person", n_ids * per_id))
    owner = torch.arange(n_ids).repeat_interleave(per_id)
    return IdentitySet([f"id{i}" for i in range(n_ids)], data.latents, data.cond, owner)


def stage1_cfg(**kw) -> MetaStage1Config:
    return MetaStage1Config(**{"steps": 30, "learning_rate": 3e-3, "r1": 8, "rank": 2, "batch_size": 2,
                               "identities_per_bucket": 2, "bucket_steps": 5, "targets": "attn", "seed": 1, **kw})


def crops(model, n=3) -> CropData:
    data = [prepare_data(model, images(1, size=16 + 8 * i, seed=i), "a photo of sks person") for i in range(n)]
    return CropData([d.latents for d in data], [d.cond for d in data])
