"""Plain LoRA training as a background job (see training/jobs.py).

The task persists its cached training data (latents, conditioning, prompts) in the
job folder at submit, and records how to rebuild the model in its config, so that a
resume, in this process or after a restart, rebuilds it without the graph that
started it. The LoRA is written, atomically, only when training completes.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable


from .diffusion import DiffusionModel
from .jobs import load_job_data, save_job_data
from .lora_format import save_bundle
from .lora_trainer import LoraTrainConfig, LoraTrainer, TrainData

ModelLoader = Callable[[dict], DiffusionModel]  # config["model_source"] -> model


class LoraJobTask:
    kind = "lora"
    phases = ["train"]

    def __init__(self, cfg: LoraTrainConfig, output_path: str, lora_name: str, model_source: dict,
                 model_loader: ModelLoader, data: TrainData | None = None, trainer_cls: type = LoraTrainer,
                 sample_every: int = 0):
        self.cfg = cfg.validate()
        self.data, self.model_loader, self.trainer_cls = data, model_loader, trainer_cls
        self.config = {"train": asdict(cfg), "output_path": output_path, "lora_name": lora_name,
                       "model_source": model_source, "sample_every": int(sample_every)}

    @classmethod
    def from_config(cls, config: dict, job_dir: Path, model_loader: ModelLoader) -> "LoraJobTask":
        return cls(LoraTrainConfig.from_dict(config["train"]), config["output_path"], config["lora_name"],
                   config["model_source"], model_loader, data=load_data(job_dir),
                   sample_every=config.get("sample_every", 0))

    def prepare(self, job_dir: Path) -> None:
        save_data(self.data, job_dir)

    def run(self, ctx) -> dict:
        # a streamed model's blocks never go to the device whole: the loader keeps them in CPU memory
        extra = {"stream_blocks": True} if self.cfg.stream_blocks else {}
        model = self.model_loader(self.config["model_source"], **extra)
        data = self.data if self.data is not None else load_data(ctx.dir)
        data = TrainData(data.latents.to(model.device), {k: v.to(model.device) for k, v in data.cond.items()},
                         data.prompts)
        trainer = self.trainer_cls(model, data, self.cfg)
        trainer.run_in_job(ctx, sample_every=self.config["sample_every"])
        bundle = trainer.bundle()
        bundle.metadata["idlora_job"] = ctx.job.id
        save_bundle(self.config["output_path"], bundle)
        ctx.log.info("saved %s", self.config["output_path"])
        return {"lora": self.config["lora_name"], "path": self.config["output_path"], "steps": trainer.step,
                "final_loss": trainer.losses[-1] if trainer.losses else None}


def save_data(data: TrainData, job_dir: Path) -> None:
    save_job_data(job_dir, {"latents": data.latents.detach().cpu(), "prompts": list(data.prompts),
                            "cond": {k: v.detach().cpu() for k, v in data.cond.items()}})


def load_data(job_dir: Path) -> TrainData:
    d = load_job_data(job_dir, "its cached training data")
    return TrainData(d["latents"], d["cond"], d["prompts"])
