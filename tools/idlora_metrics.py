#!/usr/bin/env python3
"""Score folders of images with the paper metrics that need their own networks: FID, CSD-s, DreamSim, ImageReward.

    python tools/idlora_metrics.py fid --generated GEN (--reference REF | --reference-stats REF.npz)
    python tools/idlora_metrics.py fid --reference REF --save-stats REF.npz          # statistics only (e.g. MS-COCO)
    python tools/idlora_metrics.py csd --generated GEN --style STYLE
    python tools/idlora_metrics.py dreamsim --generated GEN --reference REF [--type ensemble] [--paired]
    python tools/idlora_metrics.py image-reward --generated GEN (--prompt TEXT | --prompts FILE)

Folders are read flat, in file-name order (--paired and --prompts pair by that order). The weights come from
ComfyUI's models folder (--models-dir; a metric's sub-folder: fid, csd, dreamsim, image_reward) and are never
downloaded: a missing file is reported with its name and folder. Writes a JSON report and a CSV beside it (--out)
and prints a summary. FID and DreamSim: lower is better; CSD-s and ImageReward: higher is better.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pack import ROOT, import_pack  # tools/ is this script's folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers / peft / open_clip never reach a hub from here


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--models-dir", type=Path, default=ROOT / ".comfy" / "models",
                        help="ComfyUI's models folder (default: %(default)s)")
    common.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    common.add_argument("--out", type=Path, default=Path("idlora_metrics_report.json"),
                        help="JSON report path; the CSV goes beside it (default: %(default)s)")
    common.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="metric", required=True)
    f = sub.add_parser("fid", parents=[common], help="FID against reference images or statistics")
    f.add_argument("--generated", type=Path, help="folder of generated images")
    f.add_argument("--reference", type=Path, help="folder of reference images")
    f.add_argument("--reference-stats", type=Path, help=".npz with 'mu' and 'sigma' of the reference set")
    f.add_argument("--save-stats", type=Path, help="write the reference folder's statistics to this .npz")
    f.add_argument("--weights", default="weights-inception-2015-12-05-6726825d.pth",
                   help="Inception file in models/fid, or a path (default: %(default)s)")
    c = sub.add_parser("csd", parents=[common], help="CSD-s style similarity to style images")
    c.add_argument("--generated", type=Path, required=True, help="folder of generated images")
    c.add_argument("--style", type=Path, required=True, help="folder of style images")
    c.add_argument("--checkpoint", default="checkpoint.pth", help="CSD file in models/csd, or a path "
                                                                  "(default: %(default)s)")
    d = sub.add_parser("dreamsim", parents=[common], help="DreamSim distance to reference images")
    d.add_argument("--generated", type=Path, required=True, help="folder of generated images")
    d.add_argument("--reference", type=Path, required=True, help="folder of reference images")
    d.add_argument("--type", default="ensemble", help="DreamSim type: ensemble, dino_vitb16, open_clip_vitb32, "
                                                      "clip_vitb32 (default: %(default)s)")
    d.add_argument("--paired", action="store_true", help="image i against reference i (by name order) instead of "
                                                         "all pairs")
    r = sub.add_parser("image-reward", parents=[common], help="ImageReward of images with their prompts")
    r.add_argument("--generated", type=Path, required=True, help="folder of generated images")
    group = r.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one prompt for every image")
    group.add_argument("--prompts", type=Path, help="a text file, one prompt per line, in the images' name order")
    return p.parse_args(argv)


def _dirs(args, metric: str) -> list[Path]:
    from idlora.models.metric_files import METRIC_FOLDERS
    return [args.models_dir / METRIC_FOLDERS[metric]]


def _fid(args, pm):
    from idlora.models import fid_inception as fi
    if args.reference is not None and args.reference_stats is not None:
        raise ValueError("give --reference or --reference-stats, not both")
    if args.generated is None and args.save_stats is None:
        raise ValueError("fid needs --generated (and a reference), or --reference with --save-stats")
    model = fi.load_inception(_dirs(args, "FID"), args.weights, args.device)
    meta, stats = {"model": model.name}, None
    if args.reference is not None:
        feats = pm.run_batched(model, pm.read_folder(args.reference))
        stats = fi.fid_statistics(feats), feats.shape[0]
        if args.save_stats is not None:
            meta["saved_stats"] = str(fi.save_statistics(args.save_stats, stats[0], stats[1]))
            print(f"reference statistics of {stats[1]} images: {meta['saved_stats']}")
    elif args.reference_stats is not None:
        stats = fi.load_statistics(args.reference_stats)
    if args.generated is None:
        return {}, meta
    if stats is None:
        raise ValueError("fid needs --reference or --reference-stats")
    gen = pm.run_batched(model, pm.read_folder(args.generated))
    return {"FID": pm.fid_from_features(gen, reference_stats=stats, model=model.name)}, meta


def _score(args, pm) -> tuple[dict, dict]:
    if args.metric == "fid":
        return _fid(args, pm)
    gen = pm.read_folder(args.generated)
    if args.metric == "csd":
        from idlora.models.csd import CSDScorer
        model = CSDScorer(_dirs(args, "CSD"), args.checkpoint, args.device)
        return pm.csd_metrics(model.style_features, gen, pm.read_folder(args.style), model.name), {}
    if args.metric == "dreamsim":
        from idlora.models.dreamsim_metric import DreamSimScorer
        model = DreamSimScorer(_dirs(args, "DreamSim"), args.type, args.device)
        return pm.dreamsim_metrics(model.embed, gen, pm.read_folder(args.reference), args.paired, model.name), {}
    from idlora.models.image_reward import ImageRewardScorer
    model = ImageRewardScorer(_dirs(args, "ImageReward"), args.device)
    prompts = args.prompt if args.prompt is not None else \
        [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    return pm.image_reward_metrics(model.score, gen, prompts, model.name), {}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    import_pack()
    from idlora.training import evaluate as ev
    from idlora.training import paper_metrics as pm

    try:
        results, meta = _score(args, pm)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not results:
        return 0
    metrics = {k: ev.jsonable(v) for k, v in results.items()}
    json_path, csv_path = ev.write_metrics_report(args.out.parent, args.out.stem, metrics,
                                                  {"metric": args.metric, **meta,
                                                   **{k: str(v) for k, v in vars(args).items()
                                                      if k in ("generated", "reference", "style", "type")}})
    print(ev.summary_text(metrics))
    print(f"\nreport: {json_path}\ncsv:    {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
