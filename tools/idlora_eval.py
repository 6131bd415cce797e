#!/usr/bin/env python3
"""Score generated images against real photos of each identity: FaceSim and R-FaceSim.

    python tools/idlora_eval.py --generated GEN --identities REAL [--reference-name NAME]
                                [--out report.json] [--embedder dlib]

REAL holds one subfolder per identity with several photos of that person; one of them is the
reference (the photo the LoRA was made from: --reference-name, else the first file by name), the
others are the test set of R-FaceSim (Meta-LoRA, Algorithm 3: the reference is left out). GEN holds
one subfolder per identity, named as in REAL, with the generated images. Images without a face are
counted per identity and left out of the means. Writes the JSON report and a CSV beside it
(report.csv), and prints a summary table.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pack import ROOT, import_pack  # tools/ is this script's folder


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--generated", required=True, type=Path, help="folder with one subfolder of generated images "
                                                                 "per identity")
    p.add_argument("--identities", required=True, type=Path, help="folder with one subfolder of real photos per "
                                                                  "identity")
    p.add_argument("--reference-name", default=None, help="file name (or stem) of the reference photo in each "
                                                          "identity folder; default: the first file by name")
    p.add_argument("--out", type=Path, default=Path("idlora_eval_report.json"),
                   help="JSON report path; the CSV goes beside it (default: %(default)s)")
    p.add_argument("--embedder", default="dlib", choices=["dlib", "arcface-onnx", "arcface-torch"],
                   help="face embedder (default: %(default)s, built in); arcface needs an insightface pack")
    p.add_argument("--insightface-dir", type=Path, default=ROOT / ".comfy" / "models" / "insightface",
                   help="arcface backends: ComfyUI's models/insightface folder (default: %(default)s)")
    p.add_argument("--pack", default="buffalo_l", choices=["buffalo_l", "antelopev2"],
                   help="arcface backends: the insightface pack (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    return p.parse_args(argv)


def format_table(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    import_pack()
    from idlora.training import evaluate as ev

    try:
        embedder = ev.build_face_embedder(args.embedder, insightface_roots=[args.insightface_dir], pack=args.pack)
        report = ev.evaluate_folders(args.generated, args.identities, embedder.embedder, args.reference_name)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json_path = ev.write_json(args.out, report)
    csv_path = ev.write_csv(args.out.with_suffix(".csv"), ev.FOLDER_CSV_HEADER, ev.folder_csv_rows(report))
    print(format_table(*ev.cli_rows(report)))
    for ident, why in report["skipped"].items():
        print(f"skipped {ident}: {why}")
    print(f"\nembedder: {report['embedder']}\nreport: {json_path}\ncsv:    {csv_path}")
    if not report["identities"]:
        print("no identity could be scored", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
