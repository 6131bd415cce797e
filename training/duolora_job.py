"""A DuoLoRA / ZipLoRA merge as a background job (training/jobs.py Task): the encoded images and prompts and the two
resolved LoRAs are persisted at submit; the merged LoRA is written, atomically, when the job completes."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable


from .diffusion import DiffusionModel
from .duolora import LoraMerger, MergeConfig, MergeData
from .jobs import load_job_data, save_job_data
from .lora_format import save_bundle

ModelLoader = Callable[[dict], DiffusionModel]


class MergeTask:
    kind = "duolora"
    phases = ["merge"]

    def __init__(self, cfg: MergeConfig, content: dict, style: dict, output_path: str, lora_name: str,
                 model_source: dict, model_loader: ModelLoader, data: MergeData | None = None):
        self.cfg, self.content, self.style, self.data = cfg.validate(), content, style, data
        self.model_loader = model_loader
        self.config = {"merge": asdict(cfg), "output_path": output_path, "lora_name": lora_name,
                       "model_source": model_source}

    @classmethod
    def from_config(cls, config: dict, job_dir: Path, model_loader: ModelLoader) -> "MergeTask":
        d = load_job_data(job_dir, "its images and LoRAs")
        loras = [{n: (w["down"], w["up"], w["alpha"]) for n, w in d[k].items()} for k in ("content_lora", "style_lora")]
        return cls(MergeConfig.from_saved(config["merge"]), *loras, config["output_path"], config["lora_name"],
                   config["model_source"], model_loader, MergeData(**d["data"]))

    def prepare(self, job_dir: Path) -> None:
        d = self.data
        pack = lambda w: {n: {"down": a, "up": b, "alpha": c} for n, (a, b, c) in w.items()}  # noqa: E731
        payload = {"data": {"content": d.content.cpu(), "style": d.style.cpu(),
                            **{k: {n: v.cpu() for n, v in getattr(d, k).items()} for k in ("cond_c", "cond_s", "cond_cs")}},
                   "content_lora": pack(self.content), "style_lora": pack(self.style)}
        save_job_data(job_dir, payload)

    def run(self, ctx) -> dict:
        model = self.model_loader(self.config["model_source"])
        merger = LoraMerger(model, self.data.to(model.device), self.cfg, self.content, self.style)
        merger.run_in_job(ctx, "merge")
        bundle = merger.bundle()
        bundle.metadata["idlora_job"] = ctx.job.id
        save_bundle(self.config["output_path"], bundle)
        return {"lora": self.config["lora_name"], "path": self.config["output_path"], "method": self.cfg.method,
                "steps": merger.step, "final_loss": merger.losses[-1] if merger.losses else None,
                "rank": max((w.down.shape[0] for w in bundle.weights.values()), default=0)}
