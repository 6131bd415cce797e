"""DiffLoRA's two training stages as background jobs (training/jobs.py Tasks).

Both read a LoRA dataset folder (training/lora_dataset.py). The identities are recorded at submit; a resume checks
that the folder still holds them, so a checkpoint is never continued on other data. The LAE job writes an LAE file;
the DiT job encodes the population with that LAE and writes the full DiffLoRA file (LAE + DiT + layout). Files are
written atomically when a job completes.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from .difflora import (DiTTrainConfig, DiTTrainer, LaeTrainConfig, LaeTrainer, encode_population, load_difflora,
                       save_difflora, schedule_of)
from .lora_dataset import load_population
from .lora_trainer import TrainingInputError
from .lora_vector import LoraLayout


def population_key(entries: list[dict]) -> list[str]:
    """``name:hash`` of every identity: a job records it at submit and a resume checks it, so that an identity
    rebuilt under the same name (other images or settings) is noticed too."""
    return [f"{e['name']}:{e['hash']}" for e in entries]


def population_arrays(dataset: str, expect: list[str] | None = None):
    """(population, layout, vectors (N, L)) of a dataset folder; ``expect``: its ``population_key`` at submit."""
    pop = load_population(dataset)
    if expect is not None and population_key(pop.entries) != list(expect):
        changed = sorted(set(expect) ^ set(population_key(pop.entries)))
        raise TrainingInputError(f"the dataset {dataset} changed since this job started ({len(expect)} identities "
                                 f"then, {len(pop.names)} now; differing: {[c.split(':')[0] for c in changed][:5]}): "
                                 f"start a new job on it")
    bundles = [pop.bundles[n] for n in pop.names]
    layout = LoraLayout.of(bundles[0].weights)
    vectors = torch.stack([layout.flatten(b.weights) for b in bundles])
    return pop, layout, vectors


def dataset_meta(pop, layout: LoraLayout) -> dict:
    first = pop.entries[0]
    return {"base_model": first.get("base_model", ""), "targets": first.get("targets", ""),
            "rank": layout.layers[0].rank, "identities": len(pop.names), "embedders": first.get("embedders", {})}


def dit_data(layout: LoraLayout, vectors: torch.Tensor, lae_path: str, device: str = "cpu"):
    """(the LAE file's DiffLora, the population's LAE latents divided by their std, that std) for DiT training."""
    lae_model = load_difflora(lae_path, device)
    if lae_model.layout != layout:
        raise TrainingInputError(f"the LAE {lae_path} was trained on another LoRA layout ({len(lae_model.layout.layers)} "
                                 f"layers, {lae_model.layout.length} numbers) than this dataset ({len(layout.layers)} "
                                 f"layers, {layout.length} numbers): train an LAE on this dataset first")
    latents = encode_population(lae_model.lae, vectors)
    scale = float(latents.std()) or 1.0
    return lae_model, latents / scale, scale


class LaeTask:
    kind = "difflora_lae"
    phases = ["lae"]

    def __init__(self, cfg: LaeTrainConfig, dataset: str, output_path: str, name: str, identities: list[str],
                 device: str = "cpu"):
        self.cfg, self.device = cfg.validate(), device
        self.config = {"train": asdict(cfg), "dataset": str(dataset), "output_path": str(output_path), "name": name,
                       "identities": list(identities)}

    @classmethod
    def from_config(cls, config: dict, job_dir: Path, device: str = "cpu") -> "LaeTask":
        return cls(LaeTrainConfig.from_dict(config["train"]), config["dataset"], config["output_path"],
                   config["name"], config["identities"], device)

    def prepare(self, job_dir: Path) -> None:
        pass  # the dataset folder is the data; its identities are in the config

    def run(self, ctx) -> dict:
        pop, layout, vectors = population_arrays(self.config["dataset"], self.config["identities"])
        trainer = LaeTrainer(vectors, self.cfg, self.device)
        ctx.log.info("LAE on %d LoRAs of %d numbers: latent %s, compression %.1fx", len(vectors), layout.length,
                     trainer.module.cfg.latent_shape, trainer.module.cfg.compression)
        trainer.run_in_job(ctx, "lae")
        report = trainer.report()
        ctx.log.info("reconstruction: relative error mean %.4f, max %.4f", report["relative_error_mean"],
                     report["relative_error_max"])
        save_difflora(self.config["output_path"], layout, trainer.module, meta=dataset_meta(pop, layout))
        return {"lae": self.config["name"], "path": self.config["output_path"], "steps": trainer.step,
                "final_loss": trainer.losses[-1] if trainer.losses else None, **report}


class DiffLoraTask:
    kind = "difflora_dit"
    phases = ["dit"]

    def __init__(self, cfg: DiTTrainConfig, dataset: str, lae_path: str, output_path: str, name: str,
                 identities: list[str], device: str = "cpu"):
        self.cfg, self.device = cfg.validate(), device
        self.config = {"train": asdict(cfg), "dataset": str(dataset), "lae_path": str(lae_path),
                       "output_path": str(output_path), "name": name, "identities": list(identities)}

    @classmethod
    def from_config(cls, config: dict, job_dir: Path, device: str = "cpu") -> "DiffLoraTask":
        return cls(DiTTrainConfig.from_dict(config["train"]), config["dataset"], config["lae_path"],
                   config["output_path"], config["name"], config["identities"], device)

    def prepare(self, job_dir: Path) -> None:
        pass

    def run(self, ctx) -> dict:
        pop, layout, vectors = population_arrays(self.config["dataset"], self.config["identities"])
        lae_model, latents, scale = dit_data(layout, vectors, self.config["lae_path"], self.device)
        trainer = DiTTrainer(latents, pop.face, pop.image, self.cfg, self.device)
        ctx.log.info("DiT on %d latents %s (scale %.4g)", len(latents), tuple(latents.shape[1:]), scale)
        trainer.run_in_job(ctx, "dit")
        save_difflora(self.config["output_path"], layout, lae_model.lae, trainer.module, scale, schedule_of(self.cfg),
                      {**lae_model.meta, **dataset_meta(pop, layout)})
        return {"difflora": self.config["name"], "path": self.config["output_path"], "steps": trainer.step,
                "final_loss": trainer.losses[-1] if trainer.losses else None}
