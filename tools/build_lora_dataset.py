#!/usr/bin/env python
"""Build DiffLoRA's per-identity LoRA dataset (Sec. 3.5) from the command line, sharded across processes or servers.

    python tools/build_lora_dataset.py --checkpoint CKPT.safetensors --data DIR --out DATASET \\
        --face-backend arcface-onnx --face-root ComfyUI/models/insightface --face-pack buffalo_l \\
        --clip-arch ViT-B-32 --clip-checkpoint open_clip_vit_b32.safetensors [--shard i --shards n] [options]
    torchrun --standalone --nproc_per_node 4 tools/build_lora_dataset.py --checkpoint ... --data ... --out ...

DIR holds one subfolder per identity with its images (.jpg .jpeg .png .webp .bmp). Identity i of the name-sorted
list belongs to shard i mod n (training/lora_dataset.shard); the shards are independent (no process group), so
they can run as torchrun processes (--shard / --shards default to $RANK / $WORLD_SIZE, process r uses
cuda:$LOCAL_RANK), as separate commands, or on several servers that share the --out folder. Every identity gets
one LoRA of the same architecture (targets + rank, one shared seed), plain LoRA or Meta-LoRA stage 2
(--trainer meta_lora --meta-down FILE), and its face and CLIP image embeddings:

  DATASET/<identity>/lora.safetensors, embeddings.safetensors, entry.json   (entry.json last, atomically)
  DATASET/manifest.json                                                     (a summary, rebuilt from the entries)

An identity is finished when its entry's content hash (its image files, the settings, the base model and the
embedders) matches: a re-run skips it without loading its images, and when a whole shard is finished it does not
even load the model. Changed images or settings rebuild just those identities. The checkpoint is loaded with
ComfyUI in-process (as tools/meta_lora_stage1.py does).

Face filter (the paper keeps the top 85 of 100 images of each identity by InsightFace similarity): --face-keep K
and / or --face-keep-fraction F drop the images without a face, then keep the K (or F x all, rounded up) images most
similar to the identity's reference face embedding (--face-reference: 'mean' or a reference image's name). What it
kept, dropped and scored is in each entry.json, and its settings are part of the identity's hash. --augment adds
centred square crops at --augment-scales, flipped at random (training/difflora_data.augmented_images).

Face embedders: dlib (built in), arcface-onnx / arcface-torch (the --face-pack recognizer under --face-root, an
insightface models folder). CLIP image embeddings: an open_clip architecture (--clip-arch; a custom one is
registered from --clip-config or from <arch>.json next to the checkpoint) with the weights of --clip-checkpoint.

The last line on stdout is a JSON summary of this shard. Exit status: 0 when done, 2 on bad input (the message
says what to fix).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

from meta_lora_stage1 import (InputError, add_clip_flags, add_comfy_flag, load_diffusion, open_clip_scorer,  # noqa: E402
                              setup_comfy, setup_logging)
from meta_lora_stage1 import TARGETS_FLAG  # noqa: E402

log = logging.getLogger("idlora.build_lora_dataset")
# (flag, DatasetConfig field, help); the types and defaults are the config's (training/lora_dataset.py)
DATASET_FLAGS = (("--steps", "steps", "steps per identity"),
                 ("--lr", "learning_rate", "learning rate"),
                 ("--rank", "rank", "LoRA rank (meta_lora: r2)"),
                 TARGETS_FLAG,
                 ("--batch-size", "batch_size", "images per step (meta_lora: 1)"),
                 ("--res", "resolution", "training resolution in px (square, a multiple of 8)"),
                 ("--class-word", "class_word", "class word of the prompts ('a photo of sks <class word>')"),
                 ("--seed", "seed", "one seed for every identity (one coordinate system)"),
                 ("--face-keep", "face_keep", "face filter: keep at most this many images per identity, the most "
                                              "similar to its reference face (0: no limit; the paper: 85 of 100)"),
                 ("--face-keep-fraction", "face_keep_fraction", "face filter: keep at most this fraction of each "
                                                                "identity's images, rounded up (1: no limit)"),
                 ("--face-reference", "face_reference", "face filter: 'mean' (the normalised mean of the identity's "
                                                        "face embeddings) or the file name (or stem) of a "
                                                        "reference image in every identity's folder"),
                 ("--augment", "augment", "crop / flip augmentation: one centred square crop per --augment-scales "
                                          "of each kept image, flipped at random (the paper: cropping and "
                                          "flipping; off by default)"),
                 ("--augment-flip", "augment_flip", "with --augment: the chance of a horizontal flip per crop"))
FACE_BACKENDS = ("dlib", "arcface-onnx", "arcface-torch")  # clip-vision / dinov2 need a ComfyUI CLIP_VISION model


def parse_args(argv=None) -> argparse.Namespace:
    from pack import import_pack
    import_pack()
    from idlora.training.config import add_flags
    from idlora.training.lora_dataset import DatasetConfig
    p = argparse.ArgumentParser(description="Build the per-identity LoRA dataset of DiffLoRA (one LoRA, face and "
                                            "CLIP image embedding per identity), sharded across processes.")
    p.add_argument("--checkpoint", required=True, help="the base model: a ComfyUI checkpoint with U-Net, CLIP and VAE")
    add_clip_flags(p)
    p.add_argument("--data", required=True, help="folder with one subfolder of images per identity")
    p.add_argument("--out", required=True, help="the LoRA dataset folder (shared by all shards)")
    p.add_argument("--shard", type=int, default=int(os.environ.get("RANK", "0")),
                   help="this process's shard, from 0 (default: $RANK, else 0)")
    p.add_argument("--shards", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                   help="number of shards (default: $WORLD_SIZE, else 1)")
    g = p.add_argument_group("embedders")
    g.add_argument("--face-backend", default="arcface-onnx", choices=FACE_BACKENDS,
                   help="face-recognition embedder (the paper: ArcFace)")
    g.add_argument("--face-root", action="append", default=[],
                   help="arcface backends: an insightface models folder (ComfyUI/models/insightface) holding "
                        "models/<pack>/; may be given several times")
    g.add_argument("--face-pack", default="buffalo_l", help="arcface backends: the insightface pack (buffalo_l, "
                                                           "antelopev2; idlora_demo: random weights, tests only)")
    g.add_argument("--clip-arch", default="ViT-B-32", help="open_clip architecture of the CLIP image embedder")
    g.add_argument("--clip-checkpoint", required=True, help="open_clip weights for --clip-arch (.safetensors / .pt)")
    g.add_argument("--clip-config", default="", help="an open_clip model config (.json) registering --clip-arch "
                                                     "(default: <arch>.json next to --clip-checkpoint, if there)")
    t = p.add_argument_group("per-identity training (one setting for the whole dataset)")
    t.add_argument("--trainer", default="lora", choices=("lora", "meta_lora"),
                   help="lora: plain LoRA; meta_lora: Meta-LoRA stage 2 on --meta-down (faster)")
    t.add_argument("--meta-down", default="", help="the Meta-Down file (tools/meta_lora_stage1.py) for meta_lora")
    add_flags(t, DatasetConfig, DATASET_FLAGS)
    scales = DatasetConfig.augment_scales
    t.add_argument("--augment-scales", type=float, nargs="+", default=scales,
                   help=f"with --augment: the crop sides as fractions of each image's shorter side (default "
                        f"{' '.join(f'{v:g}' for v in scales)})")
    p.add_argument("--log-every", type=int, default=50, help="a progress line every N steps")
    add_comfy_flag(p)
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> None:
    if not Path(a.checkpoint).is_file():
        raise InputError(f"--checkpoint {a.checkpoint} is not a file: pass the path of a .safetensors checkpoint")
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise InputError(f"--out {a.out} is a file: pass a folder (the LoRA dataset)")
    if a.shards < 1:
        raise InputError(f"--shards = {a.shards} is invalid: use a whole number >= 1 (1: no sharding)")
    if not 0 <= a.shard < a.shards:
        raise InputError(f"--shard = {a.shard} is invalid for {a.shards} shards: use 0 <= --shard < {a.shards} (the "
                         f"shards are numbered from 0)")
    if a.log_every < 1:
        raise InputError(f"--log-every = {a.log_every} is invalid: use N >= 1")
    if a.face_backend != "dlib" and not a.face_root:
        raise InputError(f"--face-backend {a.face_backend} needs --face-root: the insightface models folder that holds "
                         f"models/{a.face_pack}/ (e.g. ComfyUI/models/insightface), or use --face-backend dlib")
    if not Path(a.clip_checkpoint).is_file():
        raise InputError(f"--clip-checkpoint {a.clip_checkpoint} is not a file: pass open_clip weights for "
                         f"--clip-arch {a.clip_arch} (e.g. ViT-B-32 weights as .safetensors)")
    if a.clip_config and not Path(a.clip_config).is_file():
        raise InputError(f"--clip-config {a.clip_config} is not a file: pass an open_clip model config (.json)")


def face_embedder_id(a: argparse.Namespace) -> str:
    """The face embeddings' name, as IDLoRA Build LoRA Dataset records it (nodes/difflora_nodes.face_embedder_id):
    the ArcFace ONNX and torch backends of one pack give the same embeddings, so both are 'arcface (<pack>)'."""
    if a.face_backend == "dlib":
        return "dlib_resnet_v1_hog"
    from idlora.training.evaluate import find_recognizer
    return f"arcface ({find_recognizer(a.face_root, a.face_pack).parent.name})"  # names the folders when missing


def dataset_config(a: argparse.Namespace):
    from idlora.training.config import from_flags
    from idlora.training.lora_dataset import DatasetConfig
    embedders = {"face": face_embedder_id(a), "image": f"open_clip {a.clip_arch} {Path(a.clip_checkpoint).name}"}
    targets = a.targets
    if a.trainer == "meta_lora" and a.meta_down:  # the Meta-Down fixes the layers (as the node records them)
        from idlora.training.meta_lora import load_meta_down
        targets = load_meta_down(a.meta_down)[1].get("idlora_targets", targets)
    return from_flags(DatasetConfig, a, DATASET_FLAGS, trainer=a.trainer, targets=targets, embedders=embedders,
                      augment_scales=tuple(a.augment_scales))


def hash_inputs(a: argparse.Namespace) -> tuple[str, str]:
    """(base model, extra) of identity_hash: the checkpoint's file name and, for meta_lora, the Meta-Down's sha256."""
    from idlora.training.lora_dataset import DatasetConfig, check_meta_down_path, file_sha256
    if a.trainer == "meta_lora" and not a.meta_down:
        raise InputError("--trainer meta_lora needs --meta-down: the Meta-Down file of tools/meta_lora_stage1.py, or "
                         "use --trainer lora")
    check_meta_down_path(DatasetConfig(trainer=a.trainer), a.meta_down or None)
    if a.meta_down and not Path(a.meta_down).is_file():
        raise InputError(f"--meta-down {a.meta_down} is not a file: train one with tools/meta_lora_stage1.py")
    return Path(a.checkpoint).name, file_sha256(a.meta_down) if a.meta_down else ""


# -- embedders -----------------------------------------------------------------------------------------------

def face_fn(a: argparse.Namespace, device):
    """images01 (k, H, W, 3) -> one vector or None (no face) per image."""
    from idlora.models.face_embed import to_uint8_rgb
    from idlora.training.evaluate import PROVIDERS, build_face_embedder
    providers = PROVIDERS["CUDA" if device.type == "cuda" else "CPU"]
    handle = build_face_embedder(a.face_backend, insightface_roots=a.face_root, pack=a.face_pack,
                                 providers=providers, device=str(device))
    log.info("face embedder %s (%s)", handle.name, handle.source)

    def embed(images01):
        arrays = [to_uint8_rgb(img, i) for i, img in enumerate(images01.detach().float().cpu().numpy())]
        return handle.embedder.embed(arrays).as_list()
    return embed


def image_fn(a: argparse.Namespace, device):
    """images01 (k, H, W, 3) -> (k, D) CLIP image embeddings."""
    import torch
    scorer = open_clip_scorer(a, device)
    log.info("CLIP image embedder open_clip %s (%s), %d-d", a.clip_arch, a.clip_checkpoint, scorer.dim)

    @torch.no_grad()
    def embed(images01):
        return scorer.image_features(images01.permute(0, 3, 1, 2).to(device)).float().cpu()
    return embed


def screen_faces(a: argparse.Namespace, cfg, identities: list, embed_face):
    """Embed the faces of the identities to build before the model is loaded: an identity without a face in any
    image stops the shard at once, naming it (DiffLoRA conditions on the face). Returns ``embed_face`` answering
    these images from the results (identity_items asks again for the same images)."""
    import hashlib
    from idlora.training.meta_lora_data import load_images

    def key(images01) -> str:
        x = images01.detach().float().cpu().contiguous()
        return hashlib.sha256(str(tuple(x.shape)).encode() + x.numpy().tobytes()).hexdigest()

    cache, faceless = {}, []
    for name, files in identities:
        images = load_images(files, cfg.resolution)
        found = cache[key(images)] = list(embed_face(images))
        if all(v is None for v in found):
            faceless.append(name)
    if faceless:
        raise InputError(f"no face was found in any image of identit{'y' if len(faceless) == 1 else 'ies'} "
                         f"{faceless} (images centre-cropped to {a.res} px; face embedder {cfg.embedders['face']}): "
                         f"DiffLoRA conditions on the face, so use images where the face is clearly visible after "
                         f"the crop, a larger --res, or remove those folders")
    log.info("faces found in %d identities", len(identities))

    def cached(images01):
        hit = cache.pop(key(images01), None)
        return hit if hit is not None else embed_face(images01)
    return cached


# -- main ------------------------------------------------------------------------------------------------------

def shard_device():
    import torch
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    torch.cuda.set_device(device)  # before ComfyUI's model_management picks torch.cuda.current_device()
    return device


def build_shard(a: argparse.Namespace) -> dict:
    from pack import import_pack
    import_pack()
    from idlora.training.difflora_data import identity_items
    from idlora.training.lora_dataset import build, finished, identity_hash, plan, shard, write_manifest
    from idlora.training.meta_lora_data import scan_identity_folder

    t0 = time.perf_counter()
    check_args(a)
    base_model, extra = hash_inputs(a)
    cfg = dataset_config(a)
    identities = scan_identity_folder(a.data)
    mine = shard(identities, a.shard, a.shards)
    out = Path(a.out)
    summary = {"shard": a.shard, "shards": a.shards, "identities": [n for n, _ in mine], "trained": [],
               "skipped": [], "dataset": str(out)}
    todo = plan(out, [(n, identity_hash(files, cfg, base_model, extra)) for n, files in mine])
    log.info("shard %d of %d: %d of %d identities in %s; %d finished, %d to build (%d changed)", a.shard, a.shards,
             len(mine), len(identities), a.data, len(todo.done), len(todo.todo), len(todo.changed))
    if not todo.todo:  # nothing to train: no model, no embedders
        if out.is_dir():
            write_manifest(out)
        return {**summary, "skipped": todo.done}

    device = shard_device()
    embed_face = screen_faces(a, cfg, [(n, fs) for n, fs in mine if n in todo.todo], face_fn(a, device))
    with tempfile.TemporaryDirectory(prefix="idlora_lora_dataset_comfy_") as base_dir:
        setup_comfy(a.comfy, base_dir, device.type == "cuda")
        if device.type == "cpu":  # ComfyUI's fp16 text encoder is 3-8x slower than fp32 on a CPU
            from comfy.cli_args import args as comfy_args
            comfy_args.fp32_text_enc = True
        diffusion = load_diffusion(a.checkpoint, "the builder", a.clip, a.clip_type)
        log.info("loaded %s (%s, %s prediction) in %.1f s on %s", a.checkpoint, diffusion.name,
                 diffusion.prediction_type, time.perf_counter() - t0, device)
        embed_image = image_fn(a, device)

        t1 = time.perf_counter()
        items = identity_items(diffusion, mine, cfg, embed_face, embed_image, base_model, extra,
                               skip=lambda n, h: finished(out, n, h))
        embed_face = embed_image = None  # the U-Net stays; the encoders are done
        diffusion.clip = diffusion.vae = None
        log.info("encoded %d identities in %.1f s", len(items), time.perf_counter() - t1)

        last = {"t": time.perf_counter(), "s": 0}

        def on_step(name: str, step: int, total: int, loss: float) -> None:
            if step % a.log_every == 0 or step == total:
                dt = (time.perf_counter() - last["t"]) / max(1, step - last["s"])
                log.info("identity %s: step %d/%d of this shard  loss %.4f  %.3f s/step", name, step, total, loss,
                         dt)
                last.update(t=time.perf_counter(), s=step)

        if items:
            result = build(diffusion, items, out, cfg, on_step=on_step, meta_down_path=a.meta_down or None)
        else:  # finished by another process meanwhile
            result = {"trained": [], "skipped": []}
            write_manifest(out)
    skipped = sorted(set(summary["identities"]) - set(result["trained"]))
    log.info("shard %d of %d done in %.1f s: %d trained, %d already finished", a.shard, a.shards,
             time.perf_counter() - t0, len(result["trained"]), len(skipped))
    return {**summary, "trained": result["trained"], "skipped": skipped}


def main(argv=None) -> int:
    a = parse_args(argv)
    setup_logging(a.shard, a.shards)
    try:
        summary = build_shard(a)
    except (ValueError, FileNotFoundError) as e:  # InputError, TrainingInputError, missing models, bad images
        log.error("%s", e)
        log.debug("traceback", exc_info=True)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
