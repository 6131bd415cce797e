#!/usr/bin/env python
"""DuoLoRA merge benchmark: step cost, learnable parameters and merge quality of ZipLoRA, ZipRank, DuoLoRA, naive.

    python benchmarks/bench_duolora.py [--model sd15|flux] [--res 256] [--rank 64] [--steps 3] [--warmup 1]
                                       [--rows all|ziplora,ziprank,duolora,duolora_k4,naive]
                                       [--quality | --no-quality] [--params | --no-params] [--out PATH]

Three parts, each run in a child process of its own (bench_lora's allocator settings, torch.set_num_threads(2)):

1. Speed. LoraMerger (training/duolora.py) on the full SD1.5 U-Net (ComfyUI's SD15 model, seeded random weights,
   driven through nodes/comfy_adapter.ComfyDiffusion as bench_lora.py does), fp32, CPU, batch 1, one content latent
   and one style latent of res/8, three random (1, 77, 768) prompt rows (p_c, p_s, p_cs), and two random LoRAs of
   rank r on "attn" (seeded random down and up factors; up is not zero, so the masks matter):

       ziplora      ZipLoRA: output-dimension masks + their orthogonality term
       ziprank      ZipRank: rank-dimension masks only (no priors, no cycle)
       duolora      DuoLoRA full: ZipRank + prior-informed init + layer priors + the Constyle cycle on every step
       duolora_k4   the same with cycle_every=4 (the cycle terms on every 4th step)
       naive        the naive sum: nothing is trained (LoraMerger.train_step returns at once)

   Per row: s/step (median after the warm-up; for cycle_every=k the steps with and without the cycle are timed
   separately and averaged over one period of k steps), GFLOP/step (torch FlopCounterMode on one more step of each
   kind, the same average), U-Net forward passes per step with and without gradient (a forward pre-hook on the
   denoiser), the trainable mask parameters, the one-off cost of the cached single-LoRA targets (built on the first
   step, timed on their own and left out of the step times), peak RSS, and the ratio to ZipLoRA.

2. Parameters. The learnable numbers of ZipRank (2 r L) and ZipLoRA (2 x the summed output dims) on the attention
   layers of the full SD1.5 and SDXL U-Nets (ComfyUI's UNetModel on the meta device), at the paper's rank 64
   (DuoLoRA Table 1: 0.07 M vs 1.33 M on SDXL) and at --rank.

3. Quality on a synthetic task with known answers, on the tiny pure-torch denoiser of tests/tiny_torch.py: two
   LoRAs trained by LoraTrainer on different random images and prompts are merged by each method for the same
   number of steps (MergeConfig's defaults: the paper's). The merged model should reproduce the content LoRA's
   prediction on the content images with p_c, and the style LoRA's on the style image with p_s; both are measured
   at held-out timesteps and noise as a relative MSE (lower is better), with the naive sum, each LoRA alone and the
   base model as references.

Nothing is hard-coded: every number comes from the runs (the paper's figures are quoted only for comparison).
Results go to benchmarks/results/bench_duolora.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from bench_lora import (  # noqa: E402  (the house helpers: child set-up, models, spawning, summaries)
    run_child,
    ALLOC_ENV, CONTENDED, CONTEXT_DIM, FLUX_CONTEXT_DIM, FLUX_DIT, FLUX_TOKENS, FULL_UNETS, ROOT, SEED, THREADS,
    TOKENS, _comfy_patcher, _flux_inputs, _inputs,
    _proc_status_mb, _setup_comfy, cpu_model,
    matmul_peak_gflops, spawn, summarize, add_run_args, report_failures, write_results,
)

RESULTS = ROOT / "benchmarks" / "results" / "bench_duolora.md"
GOAL = 1.05           # the goal: a ZipRank / DuoLoRA step at most 1.05x a ZipLoRA step
PAPER_RANK = 64
PAPER_PARAMS_M = {"ziprank": "0.07", "ziplora": "1.33"}          # DuoLoRA Table 1 (SDXL), millions
PAPER_MINUTES = {"ziplora": 5.48, "ziprank": 5.28, "duolora": 6.38}  # DuoLoRA Table 1, training time
LORA_TARGETS = "attn"
# --model flux: Flux-dev's width, 2 double + 4 single blocks (bench_lora's FLUX_DIT); LoRAs on flux_attn, and DuoLoRA's
# layer priors by block pattern (a DiT has no feature-map sizes): content on the double blocks, style on the single
FLUX_TARGETS, FLUX_BLOCKS = "flux_attn", ("^double_blocks\\.", "^single_blocks\\.")

# row name -> (MergeConfig.method, cycle_every, what it is)
ROWS = {
    "ziplora": ("ziplora", 1, "ZipLoRA: output-dim masks + orthogonality"),
    "ziprank": ("ziprank", 1, "ZipRank: rank masks only"),
    "duolora": ("duolora", 1, "DuoLoRA full, cycle every step"),
    "duolora_k4": ("duolora", 4, "DuoLoRA full, cycle_every=4"),
    "naive": ("naive", 1, "naive sum, no training"),
}

# Quality task (tiny model). Fixed before any merge was measured; not tuned per method.
Q_IMAGE_PX = 64          # 8x8 latents
Q_LORA_RANK = 8
Q_LORA_STEPS = 100
Q_LORA_LR = 1e-2
Q_EVAL_DRAWS = 64        # held-out (image, timestep, noise) draws per concept
Q_EVAL_SEED = 9001
Q_PROMPTS = ("a v1 object in s1 style", "a v2 object in s2 style", "a v1 object in s2 style")
# quality row -> (method, cycle_every, layer kinds: "measured" = LoraMerger's own classification, or "split")
Q_ROWS = {
    "ziplora": ("ziplora", 1, "measured"),
    "ziprank": ("ziprank", 1, "measured"),
    "duolora": ("duolora", 1, "measured"),
    "duolora_k4": ("duolora", 4, "measured"),
    "duolora_split": ("duolora", 1, "split"),
    "naive": ("naive", 1, "measured"),
}


# =====================================================================================================
# child side
# =====================================================================================================

class PassCounter:
    """Counts calls of a module (the denoiser's forward), split by whether autograd was recording."""

    def __init__(self, module):
        import torch

        self.grad = self.nograd = 0
        self._torch = torch
        self.handle = module.register_forward_pre_hook(self._pre)

    def _pre(self, module, args):
        if self._torch.is_grad_enabled():
            self.grad += 1
        else:
            self.nograd += 1

    def snapshot(self) -> tuple[int, int]:
        return self.grad, self.nograd

    def remove(self) -> None:
        self.handle.remove()


def random_loras(targets: dict, rank: int, seed: int) -> dict:
    """{name: (down (r, d_in), up (d_out, r), alpha = r)}: seeded random factors, both non-zero."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(targets):
        d_out, d_in = targets[name].weight.shape[:2]
        down = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
        up = torch.randn(d_out, rank, generator=g) * (0.1 / rank ** 0.5)
        out[name] = (down, up, float(rank))
    return out


def run_speed(spec: dict) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with tempfile.TemporaryDirectory(prefix="bench_duolora_") as base_dir:
        _setup_comfy(base_dir)
        from pack import import_pack
        import_pack()
        from idlora.models.lora import select_targets
        from idlora.nodes.comfy_adapter import ComfyDiffusion
        from idlora.training.duolora import LoraMerger, MergeConfig, MergeData, param_counts

        method, k = spec["method"], spec["cycle_every"]
        flux = spec.get("model") == "flux"
        patcher = _comfy_patcher("flux" if flux else "sd15", SEED)
        model = ComfyDiffusion(patcher)
        g = torch.Generator().manual_seed(SEED + 1)
        if flux:  # a T5-sized context and a pooled vector per prompt row
            (lat_c, lat_s), ctx_c, pooled = _flux_inputs(spec["res"], SEED, FLUX_TOKENS, n_latents=2)
            rows = [{"context": ctx_c, "y": pooled}] + [
                {"context": torch.randn((1, FLUX_TOKENS, FLUX_CONTEXT_DIM), generator=g),
                 "y": torch.randn(pooled.shape, generator=g)} for _ in range(2)]
        else:
            (lat_c, lat_s), ctx_c = _inputs(spec["res"], SEED, n_latents=2)
            rows = [{"context": ctx_c}] + [{"context": torch.randn((1, TOKENS, CONTEXT_DIM), generator=g)}
                                           for _ in range(2)]
        data = MergeData(lat_c, lat_s, *rows)
        targets = select_targets(model.denoiser, FLUX_TARGETS if flux else LORA_TARGETS)
        shapes = {n: tuple(m.weight.shape[:2]) for n, m in targets.items()}
        content = random_loras(targets, spec["rank"], SEED + 10)
        style = random_loras(targets, spec["rank"], SEED + 20)
        n_timed = max(spec["steps"], k)  # a full cycle period is timed
        blocks = dict(zip(("content_blocks", "style_blocks"), FLUX_BLOCKS)) if flux else {}
        cfg = MergeConfig(method=method, steps=spec["warmup"] + n_timed + k + 1, seed=SEED, precision="fp32",
                          rank=spec["rank"], cycle_every=k, **blocks)

        counter = PassCounter(model.denoiser)
        w0, p0 = time.perf_counter(), counter.snapshot()
        merger = LoraMerger(model, data, cfg, content, style)  # the node's path: it classifies the layers itself
        ctor_s, ctor_passes = time.perf_counter() - w0, _diff(counter.snapshot(), p0)
        kinds = Counter(kind for kind, _ in merger.layer_kinds.values())
        masks = merger.network.mask_parameters()
        trainable = 0 if method == "naive" else sum(p.numel() for p in masks)  # naive: train_step never steps them
        expected = param_counts(shapes, spec["rank"])[method if method != "duolora" else "ziprank"]

        build = {"s": 0.0, "cpu": 0.0, "grad": 0, "nograd": 0, "calls": 0}
        original_build = merger.build_draws

        def timed_build():  # the cached single-LoRA targets (the first step builds them)
            b0, c0, q0 = time.perf_counter(), time.process_time(), counter.snapshot()
            original_build()
            q = _diff(counter.snapshot(), q0)
            build.update(s=build["s"] + time.perf_counter() - b0, cpu=build["cpu"] + time.process_time() - c0,
                         grad=build["grad"] + q[0], nograd=build["nograd"] + q[1], calls=build["calls"] + 1)
        merger.build_draws = timed_build

        def step(count_flops: bool = False) -> dict:
            before = dict(build)
            q0 = counter.snapshot()
            fc = FlopCounterMode(display=False) if count_flops else None
            w, c = time.perf_counter(), time.process_time()
            if fc is not None:
                with fc:
                    merger.train_step()
            else:
                merger.train_step()
            wall, cpu = time.perf_counter() - w, time.process_time() - c
            q = _diff(counter.snapshot(), q0)
            rec = dict(wall=wall - (build["s"] - before["s"]), cpu=cpu - (build["cpu"] - before["cpu"]),
                       grad=q[0] - (build["grad"] - before["grad"]),
                       nograd=q[1] - (build["nograd"] - before["nograd"]),
                       parts=sorted(getattr(merger, "parts", {}) or {}) if method != "naive" else [])
            rec["kind"] = f"{rec['grad']}+{rec['nograd']}"
            if fc is not None:
                rec["flops"] = fc.get_total_flops()
            return rec

        rss_start = _proc_status_mb("VmRSS")
        with merger.session():
            for _ in range(spec["warmup"]):
                step()
            timed = [step() for _ in range(n_timed)]
            window = timed[-k:]  # one full period of the cycle schedule
            need = {r["kind"] for r in window}
            flops_by_kind: dict[str, float] = {}
            for _ in range(2 * k + 1):  # one FLOP-counted step of each kind in the period
                if need <= set(flops_by_kind):
                    break
                r = step(count_flops=True)
                flops_by_kind.setdefault(r["kind"], r["flops"])
            if not need <= set(flops_by_kind):
                raise RuntimeError(f"could not count a step of each kind {sorted(need)} (got {sorted(flops_by_kind)})")
        counter.remove()
        med = {kind: statistics.median(r["wall"] for r in timed if r["kind"] == kind) for kind in need}
        return dict(
            times=[r["wall"] for r in timed], cpu=[r["cpu"] for r in timed], kinds=[r["kind"] for r in timed],
            parts=[r["parts"] for r in timed], period=[r["kind"] for r in window],
            amortized_s=sum(med[r["kind"]] for r in window) / len(window),
            median_by_kind=med, flops_by_kind=flops_by_kind,
            flops=sum(flops_by_kind[r["kind"]] for r in window) / len(window),
            grad_passes=sum(r["grad"] for r in window) / len(window),
            nograd_passes=sum(r["nograd"] for r in window) / len(window),
            build_s=build["s"], build_cpu=build["cpu"], build_passes=[build["grad"], build["nograd"]],
            build_calls=build["calls"], cached_draws=cfg.cached_draws, ctor_s=ctor_s, ctor_passes=list(ctor_passes),
            trainable=trainable, mask_numel=sum(p.numel() for p in masks), expected_trainable=expected,
            layers=len(merger.network.names), layer_kinds=dict(kinds), rss_start=rss_start,
            losses=merger.losses, last_parts=getattr(merger, "parts", {}))


def _diff(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] - b[0], a[1] - b[1]


def run_params(spec: dict) -> dict:
    """Learnable numbers of the merge methods on the attention layers of the full SD1.5 / SDXL U-Nets (meta)."""
    import torch

    with tempfile.TemporaryDirectory(prefix="bench_duolora_") as base_dir:
        _setup_comfy(base_dir)
        from pack import import_pack
        import_pack()
        import comfy.ops
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
        from idlora.models.lora import select_targets
        from idlora.training.duolora import param_counts

        configs = {k: dict(v) for k, v in FULL_UNETS.items()}
        out = {}
        for family, cfg in configs.items():
            with torch.device("meta"):
                unet = UNetModel(**cfg, device="meta", operations=comfy.ops.disable_weight_init)
            targets = select_targets(unet, LORA_TARGETS)
            shapes = {n: tuple(m.weight.shape[:2]) for n, m in targets.items()}
            out[family] = dict(layers=len(shapes), d_out_sum=sum(o for o, _ in shapes.values()),
                               unet_params=sum(p.numel() for p in unet.parameters()),
                               counts={str(r): param_counts(shapes, r) for r in spec["ranks"]})
            del unet
        return dict(models=out)


def run_quality(spec: dict) -> dict:
    import torch

    from pack import import_pack
    import_pack()
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from idlora.training.diffusion import add_noise
    from idlora.training.duolora import CONTENT, STYLE, LoraMerger, MergeConfig, MergeData
    from idlora.training.lora_trainer import LoraTrainConfig, LoraTrainer, prepare_data
    from tiny_torch import TinyDiffusion, images

    model = TinyDiffusion(seed=SEED)
    p_c, p_s, p_cs = Q_PROMPTS
    c_data = prepare_data(model, images(2, size=Q_IMAGE_PX, seed=11), p_c)
    s_data = prepare_data(model, images(1, size=Q_IMAGE_PX, seed=12), p_s)
    with torch.no_grad():
        cond_cs = model.encode_prompts([p_cs], Q_IMAGE_PX, Q_IMAGE_PX)

    def train(data, seed):
        trainer = LoraTrainer(model, data, LoraTrainConfig(steps=Q_LORA_STEPS, learning_rate=Q_LORA_LR,
                                                           rank=Q_LORA_RANK, seed=seed, targets=LORA_TARGETS))
        bundle = trainer.run()
        return trainer, {n: (w.down, w.up, w.alpha) for n, w in bundle.weights.items()}

    t0 = time.perf_counter()
    c_trainer, content = train(c_data, 1)
    s_trainer, style = train(s_data, 2)
    lora_s = time.perf_counter() - t0
    data = MergeData(c_data.latents, s_data.latents, {k: v[:1] for k, v in c_data.cond.items()}, s_data.cond,
                     cond_cs)

    # held-out draws: a generator of its own, timesteps over the whole schedule
    g = torch.Generator().manual_seed(Q_EVAL_SEED)

    def draws(latents, cond):
        n = Q_EVAL_DRAWS
        idx = torch.randint(0, latents.shape[0], (n,), generator=g)
        x0 = latents[idx]
        sigma = model.sigmas[torch.randint(0, len(model.sigmas), (n,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        return add_noise(model.prediction_type, x0, noise, sigma), sigma, {k: v[:1].expand(n, *v.shape[1:]) for k, v in cond.items()}

    eval_sets = {"content": draws(data.content, data.cond_c), "style": draws(data.style, data.cond_s)}

    def predict(network=None) -> dict:
        out = {}
        for which, (x_t, sigma, cond) in eval_sets.items():
            with torch.no_grad():
                if network is None:
                    out[which] = model.net_forward(x_t, sigma, cond).float()
                else:
                    with network.attached():
                        out[which] = model.net_forward(x_t, sigma, cond).float()
        return out

    base = predict()
    single = {"content": predict(c_trainer.network)["content"], "style": predict(s_trainer.network)["style"]}

    def errors(pred: dict) -> dict:
        out = {}
        for which in ("content", "style"):
            err = (pred[which] - single[which]).pow(2).mean()
            out[which] = float(err / (base[which] - single[which]).pow(2).mean())
            out[which + "_vs_pred"] = float(err / single[which].pow(2).mean())
        return out

    refs = {"no LoRA (base model)": errors(base), "content LoRA alone": errors(predict(c_trainer.network)),
            "style LoRA alone": errors(predict(s_trainer.network))}
    effect = {which: float((base[which] - single[which]).pow(2).mean() / single[which].pow(2).mean())
              for which in ("content", "style")}

    rows = {}
    for row, (method, k, kinds) in Q_ROWS.items():
        cfg = MergeConfig(method=method, steps=spec["merge_steps"], seed=SEED, cycle_every=k, targets=LORA_TARGETS)
        layer_kinds = None
        if kinds == "split":  # first block content-dominant, second style-dominant: both prior branches run
            names = sorted(set(content) | set(style))
            layer_kinds = {n: (CONTENT if n.startswith("blocks.0.") else STYLE, None) for n in names}
        w0 = time.perf_counter()
        merger = LoraMerger(model, data, cfg, content, style, layer_kinds)
        merger.run()
        wall = time.perf_counter() - w0
        m_c = torch.cat([l.m_c.detach().flatten() for _, l in merger.network.items()])
        m_s = torch.cat([l.m_s.detach().flatten() for _, l in merger.network.items()])
        rows[row] = dict(errors(predict(merger.network)), method=method, cycle_every=k, kinds=kinds,
                         layer_kinds=dict(Counter(v[0] for v in merger.layer_kinds.values())),
                         loss_first=merger.losses[0], loss_last=merger.losses[-1], wall_s=wall,
                         mean_abs_mc=float(m_c.abs().mean()), mean_abs_ms=float(m_s.abs().mean()),
                         zero_mc=float((m_c == 0).float().mean()), zero_ms=float((m_s == 0).float().mean()),
                         last_parts=getattr(merger, "parts", {}))
    return dict(rows=rows, refs=refs, effect=effect, lora_s=lora_s, layers=len(set(content) | set(style)),
                latent=list(data.content.shape[-2:]))


def child_main(spec: dict, result_path: str) -> int:
    return run_child({"speed": run_speed, "params": run_params, "quality": run_quality}[spec["part"]], spec,
                     result_path)


# =====================================================================================================
# parent side: plan, spawn, tabulate
# =====================================================================================================

def summarize_speed(res: dict, n_timed: int, peak: float) -> dict:
    """bench_lora.summarize, then the step time and FLOPs averaged over one cycle period."""
    res = summarize(res, n_timed, peak)
    if not res.get("ok"):
        return res
    res["s_per_step"] = res["amortized_s"]
    res["gflops"] = res["gflop_per_step"] / res["s_per_step"] if res["s_per_step"] > 0 else 0.0
    res["peak_share"] = res["gflops"] / peak
    res["trains"] = res["flops"] > 0  # the naive row does no U-Net work at all
    return res


def _passes(r: dict) -> str:
    def fmt(v: float) -> str:
        return f"{v:g}" if v == int(v) else f"{v:.2f}"
    text = f"{fmt(r['grad_passes'])} + {fmt(r['nograd_passes'])}"
    by_kind = Counter(r["period"])
    if len(by_kind) > 1:
        text += " (avg of " + ", ".join(f"{n}x {kind.replace('+', ' + ')}" for kind, n in sorted(by_kind.items())) + ")"
    return text


def speed_table(rows: list[tuple[dict, dict]], ref: dict | None) -> str:
    head = ("| row | what | trainable mask params | U-Net passes / step (grad + no-grad) | s/step | min-max s "
            "| GFLOP/step | GFLOP/s | % of mm peak | CPU s / wall s | one-off: cached targets s (passes) | peak RSS MB "
            "| time / ZipLoRA | FLOPs / ZipLoRA |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for spec, r in rows:
        pre = f"| {spec['row']} | {spec['what']} |"
        if not r.get("ok"):
            lines.append(pre + f" failed: {str(r.get('error', 'unknown')).replace('|', '/')} |" + " |" * 11)
            continue
        one_off = (f"{r['build_s']:.2f} ({r['build_passes'][1]} no-grad)" if r["build_calls"] else "none")
        if r["trains"]:
            perf = (f"{r['s_per_step']:.3f} | {r['s_min']:.3f}-{r['s_max']:.3f} | {r['gflop_per_step']:.1f} | "
                    f"{r['gflops']:.1f} | {100 * r['peak_share']:.0f}% | {r['cpu_per_wall']:.2f}")
        else:
            perf = f"{r['s_per_step']:.6f} | - | {r['gflop_per_step']:.1f} | - | - | -"
        rel = (f"{r['s_per_step'] / ref['s_per_step']:.2f}x | {r['flops'] / ref['flops']:.2f}x" if ref else "- | -")
        lines.append(pre + f" {r['trainable']:,} | {_passes(r)} | {perf} | {one_off} | {r['peak_rss_mb']:.0f} "
                           f"| {rel} |")
    return "\n".join(lines)


def goal_lines(rows: list[tuple[dict, dict]]) -> list[str]:
    got = {spec["row"]: r for spec, r in rows if r.get("ok")}
    zl = got.get("ziplora")
    paper = ", ".join(f"{m} {PAPER_MINUTES[m] / PAPER_MINUTES['ziplora']:.2f}x" for m in ("ziprank", "duolora"))
    out = [f"Goal (from the issue): a ZipRank or DuoLoRA step at most {GOAL}x a ZipLoRA step (judged on the measured "
           f"s/step). For comparison, the paper's Table 1 training times relative to ZipLoRA: {paper}."]
    if zl is None:
        return out + ["- not judged: the ZipLoRA row was not measured (add 'ziplora' to --rows) or it failed"]
    for name in ("ziprank", "duolora", "duolora_k4"):
        r = got.get(name)
        if r is None:
            continue
        t, f = r["s_per_step"] / zl["s_per_step"], r["flops"] / zl["flops"]
        verdict = "meets the goal" if t <= GOAL else "MISSES the goal"
        out.append(f"- {name} ({ROWS[name][2]}): {t:.2f}x time, {f:.2f}x FLOPs, U-Net passes {_passes(r)} vs "
                   f"ZipLoRA's {_passes(zl)}: {verdict} of <= {GOAL}x")
    return out + explain(got)


def explain(got: dict) -> list[str]:
    """Why DuoLoRA full does or does not meet the goal, from the measured pass counts and times."""
    zl, du = got.get("ziplora"), got.get("duolora")
    if not (zl and du):
        return []
    out = []
    plain = got.get("ziprank")
    lines = [f"- why: a ZipLoRA step runs {_passes(zl)} U-Net passes (grad + no-grad: the content and the style "
             f"reconstruction); a DuoLoRA step with the cycle runs {_passes(du)}: the same two reconstruction passes, "
             f"the cycle's two translating passes (p_cs, no gradient) and its two reconstructing passes (p_c / p_s, "
             f"with gradient, so their backward runs too). Measured: {du['s_per_step'] / zl['s_per_step']:.2f}x the "
             f"time and {du['flops'] / zl['flops']:.2f}x the FLOPs of ZipLoRA."]
    if plain:
        extra = du["s_per_step"] - plain["s_per_step"]
        room = GOAL * zl["s_per_step"] - plain["s_per_step"]
        lines.append(f"- the cycle adds {extra:.3f} s to a ZipRank step ({plain['s_per_step']:.3f} s); the goal leaves "
                     f"{room:.3f} s of room over a ZipRank step"
                     + (f", so on average it fits only with cycle_every >= {max(1, -(-extra // room)):.0f} (the "
                        f"cycle on at most one step in that many)" if room > 0 else
                        ", none: even without the cycle the goal is not met"))
    k4 = got.get("duolora_k4")
    if k4:
        lines.append(f"- with cycle_every=4 the cycle's cost is spread over four steps: "
                     f"{k4['s_per_step'] / zl['s_per_step']:.2f}x ZipLoRA on average (per-kind medians: "
                     + ", ".join(f"{kind.replace('+', ' + ')} passes {s:.3f} s" for kind, s in
                                 sorted(k4["median_by_kind"].items())) + ").")
    out += lines
    return out


def one_off_lines(rows: list[tuple[dict, dict]]) -> list[str]:
    out = []
    for spec, r in rows:
        if not r.get("ok"):
            continue
        line = (f"- {spec['row']}: constructor {r['ctor_s']:.2f} s ({r['ctor_passes'][1]} no-grad U-Net pass(es): "
                f"the layer classification)")
        if r["build_calls"]:
            eq = f" = {r['build_s'] / r['s_per_step']:.1f} steps" if r["trains"] and r["s_per_step"] > 0 else ""
            line += (f"; cached targets {r['build_s']:.2f} s ({r['build_passes'][1]} no-grad passes for "
                     f"{r['cached_draws']} draws{eq})")
        else:
            line += "; no cached targets (nothing is trained)"
        out.append(line)
    return out


def params_table(res: dict, rank: int) -> tuple[str, list[str]]:
    head = ("| model | rank | attention layers L | sum of output dims | ZipRank 2rL | ZipLoRA 2 x sum d_out "
            "| ZipLoRA / ZipRank |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    notes = []
    ranks = sorted({PAPER_RANK, rank})
    for family, m in res["models"].items():
        for r in ranks:
            c = m["counts"][str(r)]
            lines.append(f"| {family} | {r} | {m['layers']} | {m['d_out_sum']:,} | {c['ziprank']:,} | {c['ziplora']:,} "
                         f"| {c['ziplora'] / c['ziprank']:.1f}x |")
    sdxl = res["models"].get("sdxl", {}).get("counts", {}).get(str(PAPER_RANK))
    if sdxl:
        got = {k: f"{sdxl[k] / 1e6:.2f}" for k in PAPER_PARAMS_M}
        same = all(got[k] == PAPER_PARAMS_M[k] for k in got)
        notes.append(f"- SDXL at rank {PAPER_RANK}: ZipRank {sdxl['ziprank']:,} ({got['ziprank']} M), ZipLoRA "
                     f"{sdxl['ziplora']:,} ({got['ziplora']} M); the paper's Table 1: {PAPER_PARAMS_M['ziprank']} M vs "
                     f"{PAPER_PARAMS_M['ziplora']} M: {'the same' if same else 'DIFFERENT'}")
    return "\n".join(lines), notes


def quality_table(res: dict) -> str:
    head = ("| row | method | cycle_every | layer kinds (content/style/other) | content: rel. err | style: rel. err "
            "| mean | content: MSE / mean(pred^2) | style: MSE / mean(pred^2) | merge loss first -> last "
            "| mean abs m_c / m_s | zero share m_c / m_s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row, q in res["rows"].items():
        lk = q["layer_kinds"]
        kinds = f"{lk.get('content', 0)}/{lk.get('style', 0)}/{lk.get('other', 0)}" + (
            " (set by hand)" if q["kinds"] == "split" else " (measured)")
        lines.append(f"| {row} | {q['method']} | {q['cycle_every']} | {kinds} | {q['content']:.4f} | {q['style']:.4f} "
                     f"| {(q['content'] + q['style']) / 2:.4f} | {q['content_vs_pred']:.2e} | {q['style_vs_pred']:.2e} "
                     f"| {q['loss_first']:.3e} -> {q['loss_last']:.3e} "
                     f"| {q['mean_abs_mc']:.3f} / {q['mean_abs_ms']:.3f} "
                     f"| {q['zero_mc']:.0%} / {q['zero_ms']:.0%} |")
    for name, q in res["refs"].items():
        lines.append(f"| {name} | reference | - | - | {q['content']:.4f} | {q['style']:.4f} "
                     f"| {(q['content'] + q['style']) / 2:.4f} | {q['content_vs_pred']:.2e} | {q['style_vs_pred']:.2e} "
                     f"| - | - | - |")
    return "\n".join(lines)


def quality_notes(res: dict, merge_steps: int) -> list[str]:
    rows = res["rows"]
    ranked = sorted(rows, key=lambda r: (rows[r]["content"] + rows[r]["style"]) / 2)
    naive = rows.get("naive")
    best = (rows[ranked[0]]["content"] + rows[ranked[0]]["style"]) / 2
    out = [f"- lowest mean relative error: {ranked[0]} ({best:.4f}); "
           f"order: {', '.join(ranked)}"]
    if naive:
        better = [r for r in rows if r != "naive" and rows[r]["content"] < naive["content"]
                  and rows[r]["style"] < naive["style"]]
        out.append(f"- better than the naive sum on both concepts: {', '.join(better) if better else 'none'}")
    inactive = [r for r, q in rows.items() if q["method"] == "duolora" and not (q["layer_kinds"].get("content")
                                                                               or q["layer_kinds"].get("style"))]
    if inactive:
        out.append(f"- {', '.join(inactive)}: LoraMerger classified no layer as content- or style-dominant, so the "
                   f"prior-informed init and the layer-prior loss are inactive there: ZipRank + the cycle loss only")
    out.append(f"- the LoRAs' effect on their own predictions, MSE(base, LoRA) / mean(LoRA pred^2): content "
               f"{res['effect']['content']:.2e}, style {res['effect']['style']:.2e}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--res", type=int, default=256, help="image size in pixels (latent = res/8), a multiple of 64")
    p.add_argument("--rank", type=int, default=64,
                   help="rank of the two random LoRAs (speed) and of the parameter table")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median over these; at least one cycle period)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--model", choices=["sd15", "flux"], default="sd15",
                   help="speed part: the full SD1.5 U-Net, or Flux-dev's width with 2 + 4 blocks (bench_lora's "
                        "reduced Flux; LoRAs on flux_attn, DuoLoRA's priors by block pattern)")
    p.add_argument("--rows", default="all", help=f"'all' or a comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--quality", action=argparse.BooleanOptionalAction, default=True,
                   help="the synthetic merge-quality task on the tiny model")
    p.add_argument("--params", action=argparse.BooleanOptionalAction, default=True,
                   help="the parameter table of the full SD1.5 / SDXL U-Nets (meta device)")
    p.add_argument("--quality-steps", type=int, default=100, help="merge steps of every method in the quality task "
                                                                  "(MergeConfig's default, the paper's 100)")
    add_run_args(p, RESULTS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.child:
        return child_main(json.loads(a.child), a.result)
    rows = [] if a.rows.strip() in ("", "none") else (
        list(ROWS) if a.rows.strip() == "all" else [r.strip() for r in a.rows.split(",") if r.strip()])
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; use 'all' or a subset of {','.join(ROWS)}")
    if a.steps < 1 or a.warmup < 0 or a.rank < 1 or a.quality_steps < 1:
        raise SystemExit("--steps, --rank and --quality-steps must be >= 1 and --warmup >= 0")
    if a.res % 64 or a.res < 64:
        raise SystemExit(f"--res must be a multiple of 64 (the SD1.5 U-Net halves the latent three times), got {a.res}")
    flux = a.model == "flux"

    import torch

    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    peak = matmul_peak_gflops() if rows else float("nan")
    header = [
        f"date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"command: python benchmarks/bench_duolora.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        f"torch {torch.__version__}, python {platform.python_version()}, CPU: {cpu_model()} "
        f"({os.cpu_count()} cores visible), torch threads: {THREADS}",
        "allocator (every run): " + " ".join(f"{k}={v}" for k, v in ALLOC_ENV.items()),
        f"fp32 matmul peak (2048^3 torch.mm, median of 5): {peak:.1f} GFLOP/s",
        (f"speed setup: NOT Flux-dev but its width with {FLUX_DIT['depth']} double + {FLUX_DIT['depth_single_blocks']} "
         f"single blocks (seeded random weights), fp32, CPU, batch 1, {a.res} px (16-channel {a.res // 8}x{a.res // 8} "
         f"latents: one content, one style), three random prompt rows (1, {FLUX_TOKENS}, {FLUX_CONTEXT_DIM}) + "
         f"pooled, two random rank-{a.rank} LoRAs on '{FLUX_TARGETS}', DuoLoRA's layer priors content_blocks "
         f"{FLUX_BLOCKS[0]} / style_blocks {FLUX_BLOCKS[1]}, MergeConfig defaults" if flux else
         f"speed setup: full SD1.5 U-Net (seeded random weights), fp32, CPU, batch 1, {a.res} px ({a.res // 8}x"
         f"{a.res // 8} latents: one content, one style), three random prompt rows (1, {TOKENS}, {CONTEXT_DIM}), two "
         f"random rank-{a.rank} LoRAs on '{LORA_TARGETS}', MergeConfig defaults")
        + f" (Adam lr 0.01, lambda_cycle 0.01, lambda_layer_prior 0.1, 8 cached draws), seed {SEED}, {a.warmup} "
        f"warm-up + {a.steps} timed steps per run (at least one full cycle period)",
    ]
    print("\n".join(header), flush=True)

    logs = Path(tempfile.mkdtemp(prefix="bench_duolora_logs_"))
    failed: list[tuple[str, dict]] = []
    speed_rows: list[tuple[dict, dict]] = []
    for i, name in enumerate(rows, 1):
        method, k, what = ROWS[name]
        spec = dict(part="speed", row=name, what=what, method=method, cycle_every=k, res=a.res, rank=a.rank,
                    steps=a.steps, warmup=a.warmup, model=a.model)
        n_timed = max(a.steps, k)
        tag = f"{i:02d}_speed_{name}"
        r = summarize_speed(spawn(spec, a.timeout, logs, a.verbose, script=Path(__file__), tag=tag), n_timed, peak)
        for j in range(a.retries):  # another process took CPU time: run it again, keep the cleaner run
            if not r.get("ok") or not r["trains"] or r["cpu_per_wall"] >= CONTENDED * THREADS:
                break
            print(f"      ({name}: CPU/wall {r['cpu_per_wall']:.2f} < {CONTENDED * THREADS:.1f}: other load competed; "
                  f"running it again)", flush=True)
            again = summarize_speed(spawn(spec, a.timeout, logs, a.verbose, script=Path(__file__),
                                          tag=f"{tag}_again{j}"), n_timed, peak)
            if again.get("ok") and again["cpu_per_wall"] > r["cpu_per_wall"]:
                r = again
        speed_rows.append((spec, r))
        if r.get("ok"):
            status = (f"{r['s_per_step']:.3f} s/step, {r['gflop_per_step']:.1f} GFLOP/step, passes {_passes(r)}, "
                      f"cached targets {r['build_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB"
                      + (f", CPU/wall {r['cpu_per_wall']:.2f}" if r["trains"] else ""))
            if r["trainable"] != r["expected_trainable"]:
                r["ok"], r["error"] = False, (f"trainable mask params {r['trainable']:,} differ from "
                                              f"param_counts' {r['expected_trainable']:,}")
        if not r.get("ok"):
            status = f"FAILED: {r.get('error')}"
            failed.append((f"speed {name}", r))
        print(f"[{i}/{len(rows)}] {name}: {status} (run wall {r['wall_s']:.0f} s, load avg {r['load_before']:.2f} -> "
              f"{r['load_after']:.2f})", flush=True)

    params = None
    if a.params:
        params = spawn(dict(part="params", ranks=sorted({PAPER_RANK, a.rank})), a.timeout, logs, a.verbose,
                       script=Path(__file__), tag="params")
        print(f"params: {'done' if params.get('ok') else 'FAILED: ' + str(params.get('error'))} "
              f"(run wall {params['wall_s']:.0f} s)", flush=True)
        if not params.get("ok"):
            failed.append(("params", params))
    quality = None
    if a.quality:
        quality = spawn(dict(part="quality", merge_steps=a.quality_steps), a.timeout, logs, a.verbose,
                        script=Path(__file__), tag="quality")
        print(f"quality: {'done' if quality.get('ok') else 'FAILED: ' + str(quality.get('error'))} "
              f"(run wall {quality['wall_s']:.0f} s)", flush=True)
        if not quality.get("ok"):
            failed.append(("quality", quality))

    md = ["# DuoLoRA merge benchmark", ""] + [f"- {h}" for h in header] + [""]
    out_lines: list[str] = []
    if rows:
        peak_end = matmul_peak_gflops()  # a peak disturbed by other load reads low; the higher one counts
        if peak_end > peak:
            for _, r in speed_rows:
                if r.get("ok"):
                    r["peak_share"] = r["gflops"] / peak_end
        i_peak = next(i for i, h in enumerate(header) if h.startswith("fp32 matmul peak"))
        md[2 + i_peak] += f" at start, {peak_end:.1f} at end; the higher one is the reference of % of mm peak"
        zl = next((r for s, r in speed_rows if s["row"] == "ziplora" and r.get("ok")), None)
        tab = speed_table(speed_rows, zl)
        goal = goal_lines(speed_rows)
        once = one_off_lines(speed_rows)
        contended = [s["row"] for s, r in speed_rows if r.get("ok") and r["trains"]
                     and r["cpu_per_wall"] < CONTENDED * THREADS]
        warn = ([f"WARNING: contended: {', '.join(contended)} ran with CPU/wall below {CONTENDED * THREADS:.1f} "
                 f"(another process competed for the cores); their timings and the time ratios are unreliable: run "
                 f"again on a quiet machine"] if contended else [])
        kinds = next((r["layer_kinds"] for _, r in speed_rows if r.get("ok")), None)
        kinds_line = ([f"- layer classification of the {sum(kinds.values())} attention layers (LoraMerger's, at "
                       f"{a.res // 8}x{a.res // 8} latents): " + ", ".join(f"{k} {v}" for k, v in kinds.items())]
                      if kinds else [])
        legend = (
            "s/step: median wall time of one merge step (forward passes, loss, backward, Adam step) over the timed "
            "steps, the cached targets' one-off cost left out; with cycle_every=k, the median of the steps with the "
            "cycle and of those without, averaged over one period of k steps. GFLOP/step: one further step of each "
            "kind counted by torch.utils.flop_counter.FlopCounterMode, averaged the same way. U-Net passes: calls of "
            "the denoiser's forward per step, with autograd recording (grad) and without (no-grad). Trainable mask "
            "params: the numbers Adam steps (checked against training/duolora.param_counts). One-off: the first step "
            "builds the cached single-LoRA targets (each draw: the content and the style LoRA alone, and their "
            "two-pass cycle references). CPU s / wall s: near "
            f"{THREADS} when the run had the cores to itself. Peak RSS: ru_maxrss of the run's own process."
        )
        section = (["## Speed (full SD1.5 U-Net)", "", tab, ""] + goal[:1] + [""] + goal[1:]
                   + ["", "One-off costs:", ""]
                   + once + [""] + kinds_line + [""] * bool(kinds_line)
                   + warn + [""] * bool(warn) + [legend, ""])
        md += section
        out_lines += (["", md[2 + i_peak].lstrip("- "), tab, ""] + goal + ["", "One-off costs:"] + once + kinds_line
                      + warn)
    if params and params.get("ok"):
        ptab, pnotes = params_table(params, a.rank)
        ptext = ["## Learnable parameters (attention layers, full U-Nets on the meta device)", "", ptab, ""] + pnotes
        ptext += [
            "", "ZipRank: one mask entry per rank component per LoRA per layer (2 r L); ZipLoRA: one per output "
                "channel per LoRA per layer (2 x sum of d_out); naive: 0 (a fixed scalar blend).", ""]
        md += ptext
        out_lines += [""] + ptext[:-2]
    if quality and quality.get("ok"):
        qtab = quality_table(quality)
        qnotes = quality_notes(quality, a.quality_steps)
        lat = quality["latent"]
        qtext = [
            "## Merge quality on a synthetic task (tiny denoiser, tests/tiny_torch.py)", "",
            f"- task: two LoRAs (rank {Q_LORA_RANK}, '{LORA_TARGETS}', {quality['layers']} layers) trained by "
            f"LoraTrainer for {Q_LORA_STEPS} steps at lr {Q_LORA_LR:g}: content on 2 random {Q_IMAGE_PX} px images "
            f"with '{Q_PROMPTS[0]}', style on 1 random image with '{Q_PROMPTS[1]}'; mixed prompt '{Q_PROMPTS[2]}'; "
            f"{lat[0]}x{lat[1]} latents",
            f"- every method merges for {a.quality_steps} steps with MergeConfig's defaults (the paper's); "
            f"duolora_split sets the layer kinds by hand (blocks.0 content-dominant, blocks.1 style-dominant), since "
            f"the tiny denoiser has a single resolution and LoraMerger's own classification finds no content/style "
            f"layers on it",
            f"- evaluation: {Q_EVAL_DRAWS} held-out (image, timestep over the whole schedule, noise) draws per "
            f"concept (seed {Q_EVAL_SEED}); content: the merged prediction on the content images with p_c against "
            f"the content LoRA's; style: on the style image with p_s against the style LoRA's",
            "- rel. err = MSE(merged, single LoRA) / MSE(base model, single LoRA): 0 reproduces the LoRA exactly, 1 "
            "is as far off as having no LoRA at all (lower is better); MSE / mean(pred^2) is the same error relative "
            "to the size of the single LoRA's prediction",
            "", qtab, ""] + qnotes + [""]
        md += qtext
        out_lines += [""] + qtext
    wall = time.perf_counter() - t_start
    notes = [f"benchmark wall time: {wall:.0f} s"]
    md += [f"- {n}" for n in notes] + [""]
    print("\n".join(out_lines))
    print("\n".join(notes))
    write_results(a.out, "\n".join(md))
    return report_failures(failed, logs)


if __name__ == "__main__":
    sys.exit(main())
