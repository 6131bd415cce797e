#!/usr/bin/env python
"""DiffLoRA training from the command line: the LoRA autoencoder (LAE) or the DiT, on a LoRA dataset folder, in one
process or under torchrun. Pure torch: no ComfyUI.

    python tools/difflora_train.py lae --dataset DIR --out LAE.safetensors [options]
    python tools/difflora_train.py dit --dataset DIR --lae LAE.safetensors --out DIFFLORA.safetensors [options]
    python tools/difflora_train.py dit --preset paper ...   (the paper's 16 x 1454 DiT; lae: its ~300x LAE)
    torchrun --standalone --nproc_per_node 2 tools/difflora_train.py dit --dataset ... --lae ... --out ...

DIR is a LoRA dataset folder (<identity>/lora.safetensors, embeddings.safetensors, entry.json), built with
tools/build_lora_dataset.py or the IDLoRA Build LoRA Dataset node. Every process loads the whole dataset, draws its
own batches (seed + rank) and the gradients are averaged (training/difflora.py), so all processes hold the same
weights. Under torchrun they talk over gloo on the CPU and nccl on CUDA (process r uses cuda:LOCAL_RANK).

lae writes the LAE file (report: compression ratio and reconstruction errors); dit encodes the dataset with the LAE
of --lae (an LAE file, or a DiffLoRA file whose LAE is reused) and writes the full DiffLoRA file (LAE + DiT), which
IDLoRA Load DiffLoRA reads. The same code as the IDLoRA Train LoRA Autoencoder / Train DiffLoRA jobs
(training/difflora_job.py).

Writes into the --work folder (default: the folder of --out):
  <out stem>.ckpt_rank{r}.pt  every --checkpoint-every steps and at the end, atomically, one per process;
                              --resume continues from them (same number of processes, settings and data; --steps
                              may grow)
  <out stem>.sync.tsv         with --sync-log: after every step, the largest difference of a weight checksum
                              between processes (0 when they are in sync); without it the checksums are compared at
                              every checkpoint, with a warning when they differ
and, at the end, --out (process 0). The last line on stdout is a JSON summary of the run.

Exit status: 0 when done (or stopped by --stop-after), 2 on bad input (the message says what to fix).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

from meta_lora_stage1 import (InputError, add_loop_flags, check_loop_args, finish, flag_dest, run_main,  # noqa: E402
                              train_steps)
from meta_lora_stage1 import LR_FLAG, MAX_GRAD_NORM_FLAG  # noqa: E402

log = logging.getLogger("idlora.difflora_train")

# (flag, config field, help); the types and defaults are the config dataclasses' (training/difflora.py)
COMMON = (("--steps", "steps", "total optimizer steps"),
          LR_FLAG,
          ("--batch-size", "batch_size", "samples per step and process"),
          ("--weight-decay", "weight_decay", "AdamW weight decay"),
          MAX_GRAD_NORM_FLAG,
          ("--seed", "seed", "seed of the initialisation (shared) and of the batches (seed + rank)"))
LAE_ONLY = (("--wp-weight", "wp_weight", "weight of the weight-preserved loss (0: reconstruction only)"),
            ("--patch", "patch", "numbers per token of the first encoder layer"),
            ("--levels", "levels", "encoder levels (each halves the length after the first)"),
            ("--channels", "channels", "conv channels (a multiple of 8 and of --heads)"),
            ("--latent-channels", "latent_channels", "latent channels"),
            ("--heads", "heads", "attention heads of the middle block"),
            ("--mlp-hidden", "mlp_hidden", "hidden width of the decoder MLP"))
DIT_ONLY = (("--hidden", "hidden", "transformer width (the paper: 1454)"),
            ("--depth", "depth", "transformer blocks (the paper: 16)"),
            ("--heads", "heads", "attention heads (--hidden must be a multiple)"),
            ("--mlp-ratio", "mlp_ratio", "MLP width / --hidden"),
            ("--timesteps", "timesteps", "diffusion steps of the linear schedule (the paper: 1000)"),
            ("--beta-start", "beta_start", "first beta of the schedule (the paper: 1e-4)"),
            ("--beta-end", "beta_end", "last beta of the schedule (the paper: 0.012)"))


def config_class(stage: str):
    from idlora.training.difflora import DiTTrainConfig, LaeTrainConfig
    return LaeTrainConfig if stage == "lae" else DiTTrainConfig


def flags(stage: str) -> tuple:
    return COMMON + (LAE_ONLY if stage == "lae" else DIT_ONLY)


def parse_args(argv=None) -> argparse.Namespace:
    from pack import import_pack
    import_pack()
    from idlora.training.config import add_flags
    from idlora.training.difflora import PRESETS
    p = argparse.ArgumentParser(description="DiffLoRA: train the LoRA autoencoder (lae) or the DiT (dit) on a LoRA "
                                            "dataset folder (single process or under torchrun).")
    sub = p.add_subparsers(dest="stage", required=True, metavar="{lae,dit}")
    for stage, what in (("lae", "the LoRA autoencoder: writes an LAE file"),
                        ("dit", "the DiT on the latents of an LAE: writes the DiffLoRA file")):
        s = sub.add_parser(stage, help=what, description=f"Train {what}.")
        s.add_argument("--dataset", required=True, help="LoRA dataset folder (tools/build_lora_dataset.py)")
        if stage == "dit":
            s.add_argument("--lae", required=True, help="the LAE file (difflora_train.py lae) trained on this dataset")
        s.add_argument("--out", required=True, help="the file to write (.safetensors)")
        cls = config_class(stage)
        paper = ", ".join(f"{k} {v:g}" for k, v in cls.preset_settings("paper").items())
        s.add_argument("--preset", default="small", choices=PRESETS,
                       help=f"small: the defaults below (a CPU, tens of LoRAs); paper: the paper's sizes and "
                            f"optimiser ({paper}). Flags given override the preset.")
        add_flags(s, cls, flags(stage))
        s.set_defaults(**{flag_dest(flag): None for flag, _, _ in flags(stage)})  # None: not given, the preset's
        s.add_argument("--work", default="", help="folder of the checkpoints and sync log (default: --out's folder)")
        add_loop_flags(s, 100, "the checkpoints in --work", "weights; writes <out stem>.sync.tsv")
    return p.parse_args(argv)


def train_config(a: argparse.Namespace):
    """The --preset's config with the flags that were given (a flag not given is None)."""
    given = {name: v for flag, name, _ in flags(a.stage) if (v := getattr(a, flag_dest(flag))) is not None}
    return config_class(a.stage).preset(a.preset, **given)


# -- paths and checks ---------------------------------------------------------------------------------

def work_dir(a: argparse.Namespace) -> Path:
    return Path(a.work) if a.work else Path(a.out).absolute().parent


def ckpt_path(a: argparse.Namespace, rank: int) -> Path:
    return work_dir(a) / f"{Path(a.out).stem}.ckpt_rank{rank}.pt"


def sync_path(a: argparse.Namespace) -> Path:
    return work_dir(a) / f"{Path(a.out).stem}.sync.tsv"


def check_args(a: argparse.Namespace) -> None:
    check_loop_args(a)
    data = Path(a.dataset)
    if not data.is_dir():
        raise InputError(f"--dataset {data} {'is a file' if data.exists() else 'does not exist'}: pass a LoRA "
                         f"dataset folder (one <identity>/ folder with lora.safetensors, embeddings.safetensors and "
                         f"entry.json each); build one with tools/build_lora_dataset.py")
    out = Path(a.out)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder: pass the path of the file to write, e.g. {out}/difflora.safetensors")
    if out.suffix != ".safetensors":
        raise InputError(f"--out {out} does not end in .safetensors: pass e.g. {out.with_suffix('.safetensors')}")
    if a.work and Path(a.work).exists() and not Path(a.work).is_dir():
        raise InputError(f"--work {a.work} is a file: pass a folder")
    if a.stage == "dit" and not Path(a.lae).is_file():
        raise InputError(f"--lae {a.lae} is not a file: train the LAE first (tools/difflora_train.py lae --dataset "
                         f"{a.dataset} --out LAE.safetensors) and pass its file")
    if a.stage == "dit" and out.absolute() == Path(a.lae).absolute():
        raise InputError(f"--out {out} is the --lae file: write the DiffLoRA file under another name")


def check_resume_files(a: argparse.Namespace, world: int) -> None:
    work, stem = work_dir(a), Path(a.out).stem
    prefix = f"{stem}.ckpt_rank"
    found = sorted(work.glob(f"{prefix}*.pt")) if work.is_dir() else []
    ranks = sorted(int(p.name[len(prefix):-3]) for p in found if p.name[len(prefix):-3].isdigit())
    if not a.resume:
        if ranks:
            raise InputError(f"{work} already holds the checkpoints of a run for {Path(a.out).name} ({len(ranks)} "
                             f"files {prefix}*.pt): pass --resume to continue it, or remove them / choose another "
                             f"--out or --work")
        return
    if not ranks:
        raise InputError(f"--resume: {work} has no {prefix}*.pt files: start without --resume")
    if ranks != list(range(world)):
        raise InputError(f"--resume: {work} holds checkpoints of {len(ranks)} processes (ranks {ranks}), this run has "
                         f"{world}: resume with the same number of processes (torchrun --nproc_per_node "
                         f"{len(ranks)})")


def file_digest(path: str | Path) -> str:
    from idlora.training.lora_dataset import file_sha256
    return file_sha256(path)[:16]


def fingerprint(a: argparse.Namespace, cfg, pop, world: int) -> dict:
    """What a resumed run must share with the run that wrote the checkpoints (--steps may grow)."""
    from idlora.training.difflora_job import population_key
    data = "\n".join(population_key(pop.entries))
    settings = {k: v for k, v in asdict(cfg).items() if k != "steps"}
    fp = {"stage": a.stage, "settings": settings, "world": world, "identities": len(pop.names),
          "dataset": hashlib.sha256(data.encode()).hexdigest()[:16]}
    if a.stage == "dit":
        fp["lae"] = file_digest(a.lae)
    return fp


def save_checkpoint(trainer, a: argparse.Namespace, rank: int, fp: dict) -> None:
    import torch
    from idlora.training.fileio import atomic_path
    path = ckpt_path(a, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"trainer": trainer.state_dict(), "fingerprint": fp}, tmp)


def load_checkpoint(trainer, a: argparse.Namespace, rank: int, fp: dict) -> None:
    import torch
    path = ckpt_path(a, rank)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  a damaged or foreign file
        raise InputError(f"--resume: cannot read {path} ({type(e).__name__}: {e}): remove the checkpoints and start "
                         f"without --resume") from None
    old = state.get("fingerprint", {}) if isinstance(state, dict) else {}
    diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in fp.items() if old.get(k) != v]
    if diff:
        raise InputError(f"--resume: the checkpoints in {work_dir(a)} were written with other settings or data "
                         f"({'; '.join(diff)}): resume with the same settings and data, or start a new run "
                         f"(another --out or --work)")
    trainer.load_state_dict(state["trainer"])


# -- sync check ------------------------------------------------------------------------------------------

def same_on_every_process(value, world: int, what: str) -> None:
    import torch.distributed as dist
    if world == 1:
        return
    values = [None] * world
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise InputError(f"the processes see {what} differently ({values}): give every process the same files (a "
                         f"folder that is not being written to)")


# -- the stages ---------------------------------------------------------------------------------------------

def make_trainer(a: argparse.Namespace, cfg, pop, layout, vectors, device):
    """(trainer, what to save at the end): the LaeTrainer, or the DiTTrainer on the --lae latents."""
    from idlora.training.difflora import DiTTrainer, LaeTrainer
    from idlora.training.difflora_job import dit_data
    from idlora.training.lora_trainer import TrainingInputError
    if a.stage == "lae":
        trainer = LaeTrainer(vectors, cfg, device)
        log.info("LAE on %d LoRAs of %d numbers: latent %s, compression %.1fx", len(vectors), layout.length,
                 trainer.module.cfg.latent_shape, trainer.module.cfg.compression)
        return trainer, {}
    try:
        lae_model, latents, scale = dit_data(layout, vectors, a.lae, device)
    except TrainingInputError as e:
        raise InputError(f"--lae: {e} (tools/difflora_train.py lae --dataset {a.dataset} ...)") from None
    trainer = DiTTrainer(latents, pop.face, pop.image, cfg, device)
    log.info("DiT on %d latents %s (scale %.4g) of the LAE %s", len(latents), tuple(latents.shape[1:]), scale, a.lae)
    return trainer, {"lae": lae_model, "scale": scale}


def write_output(a: argparse.Namespace, trainer, extra: dict, pop, layout) -> dict:
    from idlora.training.difflora import save_difflora, schedule_of
    from idlora.training.difflora_job import dataset_meta
    meta = dataset_meta(pop, layout)
    result = {"stage": a.stage, "path": str(Path(a.out).absolute()), "steps": trainer.step,
              "final_loss": trainer.losses[-1] if trainer.losses else None, "identities": len(pop.names)}
    if a.stage == "lae":
        save_difflora(a.out, layout, trainer.module, meta=meta)
        report = trainer.report()
        log.info("reconstruction: relative error mean %.4f, max %.4f; compression %.1fx",
                 report["relative_error_mean"], report["relative_error_max"], report["compression"])
        return {**result, **report}
    lae_model = extra["lae"]
    save_difflora(a.out, layout, lae_model.lae, trainer.module, extra["scale"], schedule_of(trainer.cfg),
                  {**lae_model.meta, **meta})
    return {**result, "latent_scale": extra["scale"]}


def train(a: argparse.Namespace, rank: int, world: int, device, backend: str) -> int:
    import torch
    import torch.distributed as dist
    from idlora.training.difflora_job import population_arrays

    t0 = time.perf_counter()
    check_args(a)
    cfg = train_config(a)
    check_resume_files(a, world)
    pop, layout, vectors = population_arrays(a.dataset)
    fp = fingerprint(a, cfg, pop, world)
    same_on_every_process(fp, world, "the dataset / LAE")
    log.info("%s: %d identities in %s, LoRAs of %d numbers (%d layers); %d process(es), backend %s, device %s",
             a.stage, len(pop.names), a.dataset, layout.length, len(layout.layers), world,
             backend if world > 1 else "none", device)
    trainer, extra = make_trainer(a, cfg, pop, layout, vectors, device)
    coll_device = device if backend == "nccl" else torch.device("cpu")

    if a.resume:
        load_checkpoint(trainer, a, rank, fp)
        steps = [None] * world
        if world > 1:  # every process must continue from the same step
            dist.all_gather_object(steps, trainer.step)
            if len(set(steps)) != 1:
                raise InputError(f"--resume: the processes' checkpoints are of different steps {steps} (a run died "
                                 f"while writing them): start a new run")
        log.info("resumed at step %d", trainer.step)

    with torch.inference_mode(False), torch.enable_grad():
        train_steps(trainer, lambda: list(trainer.module.parameters()), a, cfg.steps, world, rank, coll_device,
                    sync_path(a), lambda: save_checkpoint(trainer, a, rank, fp), "weights")
    trainer.module.eval()

    def write() -> None:
        result = write_output(a, trainer, extra, pop, layout)
        log.info("wrote %s after %d steps; total %.1f s", result["path"], trainer.step, time.perf_counter() - t0)
        print(json.dumps(result), flush=True)

    return finish(trainer.step, cfg.steps, world, rank, write)


def main(argv=None) -> int:
    return run_main(train, parse_args(argv), quiet=("idlora.training.lora_format",),  # a line per identity otherwise
                    logger=log)

if __name__ == "__main__":
    sys.exit(main())
