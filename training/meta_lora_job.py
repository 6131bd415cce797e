"""Meta-LoRA stage 1 and stage 2 as background jobs (training/jobs.py Tasks).

Both persist their encoded data in the job folder at submit and record how to rebuild the model, so that a
resume (after a cancel or a restart) continues from the checkpoint: stage 1 across and inside buckets, with every
identity's Mid / Up. Outputs are written atomically when a job completes.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable


from .diffusion import DiffusionModel
from .jobs import load_job_data, save_job_data
from .lora_format import LoraBundle, LoraWeight, save_bundle
from .meta_lora import (CropData, IdentitySet, MetaLoraStage1, MetaStage1Config, MetaStage2Config, load_meta_down,
                        save_meta_down, stage2_trainer)

ModelLoader = Callable[[dict], DiffusionModel]


def _save(payload: dict, job_dir: Path) -> None:
    save_job_data(job_dir, payload)


def _load(job_dir: Path) -> dict:
    return load_job_data(job_dir, "its encoded images")


class MetaStage1Task:
    kind = "meta_lora_stage1"
    phases = ["meta_train"]

    def __init__(self, cfg: MetaStage1Config, output_path: str, name: str, model_source: dict,
                 model_loader: ModelLoader, data: IdentitySet | None = None):
        self.cfg, self.data, self.model_loader = cfg.validate(), data, model_loader
        self.config = {"train": asdict(cfg), "output_path": output_path, "name": name, "model_source": model_source}

    @classmethod
    def from_config(cls, config: dict, job_dir: Path, model_loader: ModelLoader) -> "MetaStage1Task":
        d = _load(job_dir)
        data = IdentitySet(d["names"], d["latents"], d["cond"], d["owner"])
        return cls(MetaStage1Config.from_dict(config["train"]), config["output_path"], config["name"],
                   config["model_source"], model_loader, data)

    def prepare(self, job_dir: Path) -> None:
        d = self.data
        _save({"names": list(d.names), "latents": d.latents.cpu(), "cond": {k: v.cpu() for k, v in d.cond.items()},
               "owner": d.owner.cpu()}, job_dir)

    def run(self, ctx) -> dict:
        model = self.model_loader(self.config["model_source"])
        d = self.data
        data = IdentitySet(d.names, d.latents.to(model.device), {k: v.to(model.device) for k, v in d.cond.items()},
                           d.owner)
        trainer = MetaLoraStage1(model, data, self.cfg)
        ctx.log.info("%d identities, q_bucket %d, warm-up %d steps per bucket", len(d.names), trainer.q_bucket,
                     trainer.q_warmup)
        trainer.run_in_job(ctx, "meta_train")
        save_meta_down(self.config["output_path"], trainer.network, trainer.meta_down_metadata(self.config["name"]))
        ctx.log.info("saved %s", self.config["output_path"])
        return {"meta_down": self.config["name"], "meta_down_path": self.config["output_path"], "steps": trainer.step,
                "identities": len(d.names), "final_loss": trainer.losses[-1] if trainer.losses else None}


class MetaPersonalizeTask:
    kind = "meta_lora_personalize"
    phases = ["personalize"]

    def __init__(self, cfg: MetaStage2Config, meta_down_path: str, output_path: str, lora_name: str,
                 model_source: dict, model_loader: ModelLoader, data: CropData | None = None,
                 sample_every: int = 0, init_lora: LoraBundle | None = None, method: str = "meta_lora"):
        """``init_lora``: the LoRA stage 2 starts from (see MetaLoraPersonalizer); kept in the job's data.pt.
        ``method``: "meta_lora", or "lora_aug" (the plain LoRA baseline on the same crops: meta_lora.stage2_trainer)."""
        self.cfg, self.data, self.model_loader = cfg.validate(), data, model_loader
        self.init_lora = init_lora
        self.config = {"train": asdict(cfg), "meta_down_path": meta_down_path, "output_path": output_path,
                       "lora_name": lora_name, "model_source": model_source, "sample_every": int(sample_every),
                       "method": method}

    @classmethod
    def from_config(cls, config: dict, job_dir: Path, model_loader: ModelLoader) -> "MetaPersonalizeTask":
        d = _load(job_dir)
        init = d.get("init_lora")
        init = None if init is None else LoraBundle(
            {n: LoraWeight(w["down"], w["up"], w["alpha"]) for n, w in init.items()})
        return cls(MetaStage2Config.from_dict(config["train"]), config["meta_down_path"], config["output_path"],
                   config["lora_name"], config["model_source"], model_loader, CropData(d["latents"], d["conds"]),
                   config.get("sample_every", 0), init, config.get("method", "meta_lora"))

    def prepare(self, job_dir: Path) -> None:
        init = None if self.init_lora is None else {
            n: {"down": w.down.detach().cpu(), "up": w.up.detach().cpu(), "alpha": w.alpha}
            for n, w in self.init_lora.weights.items()}
        _save({"latents": [x.cpu() for x in self.data.latents],
               "conds": [{k: v.cpu() for k, v in c.items()} for c in self.data.conds], "init_lora": init}, job_dir)

    def run(self, ctx) -> dict:
        model = self.model_loader(self.config["model_source"])
        data = CropData([x.to(model.device) for x in self.data.latents],
                        [{k: v.to(model.device) for k, v in c.items()} for c in self.data.conds])
        weights, meta = load_meta_down(self.config["meta_down_path"])
        trainer = stage2_trainer(self.config["method"], model, data, self.cfg, weights, meta, self.init_lora)
        trainer.run_in_job(ctx, "personalize", self.config["sample_every"])
        bundle = trainer.bundle()
        bundle.metadata["idlora_job"] = ctx.job.id
        save_bundle(self.config["output_path"], bundle)
        return {"lora": self.config["lora_name"], "path": self.config["output_path"], "steps": trainer.step,
                "final_loss": trainer.losses[-1] if trainer.losses else None,
                "method": self.config["method"],
                "init_projection_error": (getattr(trainer, "init_report", None) or {}).get("delta_error")}
