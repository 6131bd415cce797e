#!/usr/bin/env python
"""Meta-LoRA's evaluation loop from the command line: for each identity, fine-tune on ONE photo (Meta-LoRA stage 2 on
a given Meta-Down, and the baseline LoRA + augmented inputs), generate with a prompt list at several step counts, and
score R-FaceSim (against the identity's other photos, the training photo excluded) and CLIP-T.

    python tools/meta_lora_eval.py --checkpoint CKPT.safetensors --meta-down META_DOWN.safetensors \\
        --data IDENTITIES --out OUTDIR [--steps 250,375,500,625,750] [--prompts PROMPTS.txt] \\
        [--clip-arch ViT-B-32 --clip-checkpoint open_clip_vit_b32.safetensors] [options]

IDENTITIES holds one subfolder per identity with two or more photos; the training photo is the first by name, or
--reference NAME in every folder. Each method trains once per identity, up to the largest step count, and its LoRA is
kept at every step count (training/meta_lora_eval.py); the snapshots generate with ComfyUI's own sampler
(nodes/comfy_sampling.py; the checkpoint is loaded with ComfyUI in-process, as tools/meta_lora_stage1.py does). A
prompt's '{}' is the subject: '<token> <class word>' to generate, '<class word>' for CLIP-T.

Writes OUTDIR/<name>.json (the report: settings, identities, the scored photos, every row with its per-identity
values), <name>.csv and <name>.md (the paper's table: one row per (method, steps), R-FaceSim and CLIP-T, with FaceSim
against the training photo and the counts), and with --save-images the generated images under OUTDIR/images/. Prints
the Markdown table, then a JSON line with the file paths.

Exit status: 0 when done, 2 on bad input (the message says what to fix).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

from meta_lora_stage1 import (InputError, add_clip_flags, add_comfy_flag, import_adapter,  # noqa: E402
                              load_checkpoint_parts, open_clip_scorer, setup_comfy)

log = logging.getLogger("idlora.meta_lora_eval")
FACE_BACKENDS = ("dlib", "arcface-onnx", "arcface-torch")
# (flag, MetaEvalConfig field, help); the types and defaults are the config's (training/meta_lora_eval.py)
EVAL_FLAGS = (("--reference", "reference", "the training photo's file name or stem in every identity folder "
                                           "('': the first by name)"),
              ("--token", "token", "the rare token of the subject ('<token> <class word>')"),
              ("--class-word", "class_word", "the class word of the subject"),
              ("--train-prompt", "train_prompt", "the prompt of every training crop ('{}': the subject)"),
              ("--images-per-prompt", "images_per_prompt", "images per prompt (seeds seed, seed + 1, ...)"),
              ("--rank", "rank", "r2 of Meta-LoRA, the rank of the baseline LoRA (the paper: 1)"),
              ("--lr", "learning_rate", "learning rate of both methods (the paper: 4e-4)"),
              ("--max-images", "max_images", "augmented crops of the training photo (the paper: up to 25)"),
              ("--res", "resolution", "each crop is resized to about res x res pixels"),
              ("--seed", "seed", "seed of the training runs and the first image seed"),
              ("--width", "width", "generated image width"),
              ("--height", "height", "generated image height"),
              ("--sample-steps", "sample_steps", "sampling steps (the paper: 30)"),
              ("--cfg", "cfg", "CFG scale; on Flux-dev its guidance, with CFG 1 (the paper: 3.5)"),
              ("--sampler", "sampler", "ComfyUI sampler name"),
              ("--scheduler", "scheduler", "ComfyUI scheduler name"))


def parse_args(argv=None) -> argparse.Namespace:
    from pack import import_pack
    import_pack()
    from idlora.training.config import add_flags
    from idlora.training.meta_lora_eval import MetaEvalConfig
    p = argparse.ArgumentParser(description="Meta-LoRA's evaluation loop: one-photo fine-tuning (Meta-LoRA and LoRA + "
                                            "augmented inputs), generation at several step counts, R-FaceSim and "
                                            "CLIP-T in the paper's table layout.")
    p.add_argument("--checkpoint", required=True, help="the base model (the Meta-Down's): a ComfyUI checkpoint")
    add_clip_flags(p)
    p.add_argument("--meta-down", required=True, help="a Meta-Down file (tools/meta_lora_stage1.py, or IDLoRA Meta-LoRA "
                                                      "Stage 1)")
    p.add_argument("--data", required=True, help="folder with one subfolder per identity, two or more photos each")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", default="meta_lora_eval", help="file stem of the report (default meta_lora_eval)")
    p.add_argument("--methods", default="meta_lora,lora_aug", help="meta_lora, lora_aug or both (comma-separated)")
    p.add_argument("--steps", default="250,375,500,625,750", help="the step counts evaluated, comma-separated (the "
                                                                  "paper's by default; 0: the base model)")
    p.add_argument("--prompts", default="", help="a text file with one prompt per line ('{}': the subject); default: "
                                                 "four prompts after the paper's R-FaceSim prompts (Table 7)")
    add_flags(p, MetaEvalConfig, EVAL_FLAGS)
    g = p.add_argument_group("scoring")
    g.add_argument("--face-backend", default="dlib", choices=FACE_BACKENDS, help="face embedder (dlib: built in)")
    g.add_argument("--face-root", nargs="*", default=[], help="insightface models folder(s) for arcface-*")
    g.add_argument("--face-pack", default="buffalo_l", help="insightface pack for arcface-*")
    g.add_argument("--clip-arch", default="ViT-B-32", help="open_clip architecture for CLIP-T (the paper: ViT-B/32)")
    g.add_argument("--clip-checkpoint", default="", help="open_clip weights for CLIP-T; without them CLIP-T is marked "
                                                         "not computed")
    g.add_argument("--clip-config", default="", help="an open_clip model config (.json) registering --clip-arch "
                                                     "(default: <arch>.json next to --clip-checkpoint, if there)")
    p.add_argument("--save-images", action="store_true", help="write the generated images to OUTDIR/images/")
    add_comfy_flag(p)
    return p.parse_args(argv)


def eval_config(a: argparse.Namespace):
    from idlora.training.config import from_flags
    from idlora.training.meta_lora_eval import DEFAULT_PROMPTS, MetaEvalConfig, parse_prompts, parse_steps
    prompts = DEFAULT_PROMPTS
    if a.prompts:
        if not Path(a.prompts).is_file():
            raise InputError(f"--prompts {a.prompts} is not a file: pass a text file with one prompt per line")
        prompts = parse_prompts(Path(a.prompts).read_text(encoding="utf-8"))
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    return from_flags(MetaEvalConfig, a, EVAL_FLAGS, methods=methods, steps=parse_steps(a.steps), prompts=prompts)


def check_args(a: argparse.Namespace) -> None:
    for flag, path in (("--checkpoint", a.checkpoint), ("--meta-down", a.meta_down)):
        if not Path(path).is_file():
            raise InputError(f"{flag} {path} is not a file")
    if a.clip_checkpoint and not Path(a.clip_checkpoint).is_file():
        raise InputError(f"--clip-checkpoint {a.clip_checkpoint} is not a file: pass open_clip weights for "
                         f"--clip-arch {a.clip_arch}, or leave it out (CLIP-T is then not computed)")
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise InputError(f"--out {a.out} is a file: pass a folder")


def run(a: argparse.Namespace) -> dict:
    import torch
    from idlora.training import evaluate as ev
    from idlora.training.meta_lora import load_meta_down
    from idlora.training.meta_lora_eval import evaluate_meta_lora, markdown_table, write_eval_report
    check_args(a)
    cfg = eval_config(a)  # bad settings fail before the model loads
    ev.sanitize_report_name(a.name)
    weights, meta = load_meta_down(a.meta_down)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    face = ev.build_face_embedder(a.face_backend, insightface_roots=a.face_root, pack=a.face_pack,
                                  providers=ev.PROVIDERS["CUDA" if cuda else "CPU"], device=str(device))
    scorer = open_clip_scorer(a, device) if a.clip_checkpoint else None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="idlora_meta_eval_comfy_") as base_dir:
        setup_comfy(a.comfy, base_dir, cuda)
        ComfyDiffusion = import_adapter()
        from idlora.nodes.comfy_sampling import ComfyGenerator
        model, clip, vae = load_checkpoint_parts(a.checkpoint, "the evaluation", a.clip, a.clip_type)
        generate = ComfyGenerator(model, clip, vae, cfg.width, cfg.height, cfg.sample_steps, cfg.cfg, cfg.sampler,
                                  cfg.scheduler)
        report = evaluate_meta_lora(
            lambda: ComfyDiffusion(model, clip, vae), a.data, weights, meta, face.embedder, generate, cfg,
            ev.make_detector("retinaface"), scorer.image_features if scorer else None,
            scorer.text_features if scorer else None,
            clip_name=f"open_clip {a.clip_arch} ({Path(a.clip_checkpoint).name})" if scorer else "",
            keep_images=a.save_images)
    report["checkpoint"], report["meta_down_file"] = str(a.checkpoint), str(a.meta_down)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(a.out)
    paths = write_eval_report(report, out, a.name)
    saved = save_images(report.get("images", {}), out / "images") if a.save_images else []
    print(markdown_table(report), end="")
    return {"json": str(paths[0]), "csv": str(paths[1]), "md": str(paths[2]), "rows": len(report["rows"]),
            "identities": len(report["identities"]), "images_saved": len(saved), "seconds": report["seconds"]}


def save_images(images: dict, folder: Path) -> list[Path]:
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for (method, steps), batch in images.items():
        for i, img in enumerate(batch):
            path = folder / f"{method}_{steps:05d}_{i:03d}.png"
            Image.fromarray((img.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)
            out.append(path)
    return out


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = parse_args(argv)
    try:
        summary = run(a)
    except (ValueError, FileNotFoundError) as e:  # InputError, TrainingInputError, MetaDownError, bad data
        log.error("%s", e)
        log.debug("traceback", exc_info=True)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
