#!/usr/bin/env python3
"""Face stack speed on the CPU: faces per second for detection, alignment and each embedder,
and the cost of the differentiable identity path (crop + ArcFace IResNet-50 forward + backward)
against scoring only (forward).

    python benchmarks/bench_faces.py [--repeats 20] [--threads 2]

Inputs: the public-domain photos in tests/assets/faces (<= 480 px). The IResNet-50 has
seeded random weights (no real ArcFace weights exist here); its cost does not depend on them.
Prints a Markdown table and writes it to benchmarks/results/bench_faces.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from pack import import_pack  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import_pack()
    import numpy as np
    import torch
    from idlora.models.face_crop import crop_faces
    from idlora.models.face_detect import RetinaFaceTiny, align, detect_batch
    from idlora.models.face_embed import DlibEmbedder, read_rgb
    from idlora.models.iresnet import ArcFaceTorch, iresnet50

    torch.set_num_threads(a.threads)
    photos = [read_rgb(p) for p in sorted((ROOT / "tests" / "assets" / "faces").glob("*.jpg")) if "no_face" not in p.name]
    n = len(photos)
    det = RetinaFaceTiny()
    faces = [f[0] for f in detect_batch(det, photos)]
    rows = []

    t = timed(lambda: [det.detect(p) for p in photos], a.repeats)
    rows.append(("detect (RetinaFace-MobileNet0.25, ONNX)", n / t, t / n * 1e3))
    t = timed(lambda: [align(p, f) for p, f in zip(photos, faces)], a.repeats)
    rows.append(("align to 112x112 (cv2.warpAffine)", n / t, t / n * 1e3))
    dlib = DlibEmbedder()
    t = timed(lambda: dlib.embed(photos), max(3, a.repeats // 4))
    rows.append(("dlib ResNet embed, incl. its HOG detect + 5-pt align", n / t, t / n * 1e3))

    torch.manual_seed(0)
    net = iresnet50().eval()
    arc = ArcFaceTorch(net)
    canvas = np.zeros((n, 480, 480, 3), dtype=np.uint8)  # pad to one size (top-left) for one batch
    for i, p in enumerate(photos):
        canvas[i, :p.shape[0], :p.shape[1]] = p[:480, :480]
    images = torch.from_numpy(canvas).permute(0, 3, 1, 2).float() / 255
    lmk = torch.stack([torch.from_numpy(np.asarray(f.landmarks, dtype=np.float32)) for f in faces])
    ref = torch.nn.functional.normalize(torch.randn(n, 512), dim=-1)

    def score():
        with torch.no_grad():
            arc.embed(crop_faces(images, lmk))

    def differentiable():
        img = images.clone().requires_grad_(True)
        loss = (1 - (arc.embed(crop_faces(img, lmk)) * ref).sum(-1)).mean()
        loss.backward()

    t_fwd = timed(score, max(3, a.repeats // 4))
    t_bwd = timed(differentiable, max(3, a.repeats // 4))
    rows.append(("ArcFace IResNet-50 (torch), crop + forward: scoring", n / t_fwd, t_fwd / n * 1e3))
    rows.append(("ArcFace IResNet-50 (torch), crop + forward + backward: identity loss", n / t_bwd, t_bwd / n * 1e3))

    lines = [
        "# Face stack speed (CPU)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}; CPU: {cpu_name()}; "
        f"threads: {a.threads}; {n} photos of <= 480 px (tests/assets/faces); median of {a.repeats} repeats "
        f"(fewer for the slow rows) after a warm-up",
        "",
        "| stage | faces/s | ms/face |",
        "|---|---|---|",
        *[f"| {name} | {fps:.1f} | {ms:.1f} |" for name, fps, ms in rows],
        "",
        f"Differentiable identity path against scoring only: {t_bwd / t_fwd:.2f}x the time "
        f"(forward + backward through the crop and the backbone, batch {n}).",
    ]
    text = "\n".join(lines)
    print(text)
    out = ROOT / "benchmarks" / "results" / "bench_faces.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
