"""DuoLoRA's synthetic merge tasks on the tiny pure-torch denoiser (tests/tiny_torch.py), with known answers.

Shared by benchmarks/bench_duolora.py (quality part) and tests/unit/test_duolora_priors.py. Two tasks, fixed
before any merge was measured (not tuned per method):

- ``overlap``: a content LoRA and a style LoRA (rank 8, every attention layer of both blocks) trained by
  LoraTrainer for 100 steps at lr 0.01, content on 2 random 64 px images with p_c, style on 1 random image with
  p_s. Both LoRAs act on every layer with comparable strength: no layer belongs to one concept, so LoraMerger
  classifies the layers itself (the tiny denoiser has no feature-map sizes: by the two LoRAs' weight shares).
- ``layered``: the same images, prompts and training, but each LoRA's effect lives in its own block: the content
  LoRA trains at full scale in blocks.0 and at a quarter scale (alpha = rank / 4, so its change there is damped
  while it trains) in blocks.1; the style LoRA the other way round. Ground truth: blocks.0 content-dominant,
  blocks.1 style-dominant, given to the merge as ``content_blocks`` / ``style_blocks`` patterns (the user's path).

The error of a merge: on held-out draws (image, timestep over the whole schedule, noise), the merged prediction on
the content images with p_c against the content LoRA's, and on the style image with p_s against the style LoRA's,
as MSE(merged, single LoRA) / MSE(base model, single LoRA): 0 reproduces the LoRA, 1 is as far off as no LoRA.
``seed`` varies everything: the tiny model's weights, the images, the LoRAs' training, the merge and the held-out
draws (seed 0 is the task of earlier benchmark results).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from idlora.training.diffusion import add_noise
from idlora.training.duolora import CONTENT, STYLE, LoraMerger, MergeConfig, MergeData, classify_by_weights
from idlora.training.lora_trainer import LoraTrainConfig, LoraTrainer, prepare_data
from tiny_torch import TinyDiffusion, images

TASKS = ("overlap", "layered")
IMAGE_PX = 64            # 8x8 latents
LORA_RANK = 8
LORA_STEPS = 100
LORA_LR = 1e-2
LORA_TARGETS = "attn"
EVAL_DRAWS = 64          # held-out (image, timestep, noise) draws per concept
EVAL_SEED = 9001
PROMPTS = ("a v1 object in s1 style", "a v2 object in s2 style", "a v1 object in s2 style")
CONTENT_BLOCKS, STYLE_BLOCKS = r"^blocks\.0\.", r"^blocks\.1\."   # the layered task's ground truth
DAMP = 0.25              # layered: a LoRA's scale (alpha / rank) in the other concept's block


@dataclass
class Task:
    name: str
    seed: int
    model: TinyDiffusion
    data: MergeData
    content: dict                      # {module: (down, up, alpha)}
    style: dict
    blocks: dict                       # layered: content_blocks / style_blocks for MergeConfig; overlap: {}
    eval_sets: dict = field(repr=False)
    base: dict = field(repr=False)     # the base model's held-out predictions
    single: dict = field(repr=False)   # each LoRA's own, on its own concept
    refs: dict = field(default_factory=dict)
    effect: dict = field(default_factory=dict)
    lora_s: float = 0.0

    @property
    def truth(self) -> dict:
        """The layered task's layer kinds {name: content | style} (empty for overlap)."""
        if not self.blocks:
            return {}
        return {n: CONTENT if n.startswith("blocks.0.") else STYLE for n in sorted({**self.content, **self.style})}


def _train(model, data, seed: int, damp_prefix: str | None, lora_steps: int) -> tuple[LoraTrainer, dict]:
    trainer = LoraTrainer(model, data, LoraTrainConfig(steps=lora_steps, learning_rate=LORA_LR, rank=LORA_RANK,
                                                       seed=seed, targets=LORA_TARGETS))
    if damp_prefix is not None:  # the other concept's block trains (and acts) at a quarter of the scale
        for name, layer in trainer.network.items():
            if name.startswith(damp_prefix):
                layer.alpha = LORA_RANK * DAMP
    bundle = trainer.run()
    return trainer, {n: (w.down, w.up, w.alpha) for n, w in bundle.weights.items()}


def build(name: str, seed: int = 0, lora_steps: int = LORA_STEPS, eval_draws: int = EVAL_DRAWS) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; use one of {TASKS}")
    layered = name == "layered"
    model = TinyDiffusion(seed=seed)
    p_c, p_s, p_cs = PROMPTS
    c_data = prepare_data(model, images(2, size=IMAGE_PX, seed=11 + 100 * seed), p_c)
    s_data = prepare_data(model, images(1, size=IMAGE_PX, seed=12 + 100 * seed), p_s)
    with torch.no_grad():
        cond_cs = model.encode_prompts([p_cs], IMAGE_PX, IMAGE_PX)
    t0 = time.perf_counter()
    c_trainer, content = _train(model, c_data, 1 + 100 * seed, "blocks.1." if layered else None, lora_steps)
    s_trainer, style = _train(model, s_data, 2 + 100 * seed, "blocks.0." if layered else None, lora_steps)
    lora_s = time.perf_counter() - t0
    data = MergeData(c_data.latents, s_data.latents, {k: v[:1] for k, v in c_data.cond.items()}, s_data.cond,
                     cond_cs)

    g = torch.Generator().manual_seed(EVAL_SEED + seed)  # held-out draws: timesteps over the whole schedule

    def draws(latents, cond):
        idx = torch.randint(0, latents.shape[0], (eval_draws,), generator=g)
        x0 = latents[idx]
        sigma = model.sigmas[torch.randint(0, len(model.sigmas), (eval_draws,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        return (add_noise(model.prediction_type, x0, noise, sigma), sigma,
                {k: v[:1].expand(eval_draws, *v.shape[1:]) for k, v in cond.items()})

    eval_sets = {"content": draws(data.content, data.cond_c), "style": draws(data.style, data.cond_s)}
    task = Task(name, seed, model, data, content, style,
                dict(content_blocks=CONTENT_BLOCKS, style_blocks=STYLE_BLOCKS) if layered else {},
                eval_sets, {}, {}, lora_s=lora_s)
    task.base = predict(task)
    task.single = {"content": predict(task, c_trainer.network)["content"],
                   "style": predict(task, s_trainer.network)["style"]}
    task.refs = {"no LoRA (base model)": errors(task, None), "content LoRA alone": errors(task, c_trainer.network),
                 "style LoRA alone": errors(task, s_trainer.network)}
    task.effect = {w: float((task.base[w] - task.single[w]).pow(2).mean() / task.single[w].pow(2).mean())
                   for w in ("content", "style")}
    return task


def predict(task: Task, network=None) -> dict:
    out = {}
    for which, (x_t, sigma, cond) in task.eval_sets.items():
        with torch.no_grad():
            if network is None:
                out[which] = task.model.net_forward(x_t, sigma, cond).float()
            else:
                with network.attached():
                    out[which] = task.model.net_forward(x_t, sigma, cond).float()
    return out


def errors(task: Task, network) -> dict:
    """content / style: MSE(merged, single LoRA) / MSE(base, single LoRA); *_vs_pred: over mean(single^2)."""
    pred = predict(task, network)
    out = {}
    for which in ("content", "style"):
        err = (pred[which] - task.single[which]).pow(2).mean()
        out[which] = float(err / (task.base[which] - task.single[which]).pow(2).mean())
        out[which + "_vs_pred"] = float(err / task.single[which].pow(2).mean())
    out["mean"] = (out["content"] + out["style"]) / 2
    return out


def merge(task: Task, method: str, steps: int = 100, **overrides) -> dict:
    """Merge the task's two LoRAs with MergeConfig's defaults (the paper's) and ``overrides``; the errors, the mask
    statistics (overall, and per ground-truth layer kind on the layered task) and the merger."""
    blocks = task.blocks if method == "duolora" else {}
    cfg = MergeConfig(method=method, steps=steps, seed=task.seed, targets=LORA_TARGETS, **blocks, **overrides)
    w0 = time.perf_counter()
    merger = LoraMerger(task.model, task.data, cfg, task.content, task.style)
    merger.run()
    wall = time.perf_counter() - w0
    layers = dict(merger.network.items())
    m_c = torch.cat([l.m_c.detach().flatten() for l in layers.values()])
    m_s = torch.cat([l.m_s.detach().flatten() for l in layers.values()])
    by_kind = {}
    for kind in (CONTENT, STYLE):
        names = [n for n, k in task.truth.items() if k == kind]
        if names:
            by_kind[kind] = {"m_c": float(torch.cat([layers[n].m_c.detach().abs().flatten() for n in names]).mean()),
                             "m_s": float(torch.cat([layers[n].m_s.detach().abs().flatten() for n in names]).mean())}
    return dict(errors(task, merger.network), method=method, overrides=overrides, wall_s=wall,
                layer_kinds=dict(Counter(v[0] for v in merger.layer_kinds.values())),
                loss_first=merger.losses[0], loss_last=merger.losses[-1],
                mean_abs_mc=float(m_c.abs().mean()), mean_abs_ms=float(m_s.abs().mean()),
                zero_mc=float((m_c == 0).float().mean()), zero_ms=float((m_s == 0).float().mean()),
                by_kind=by_kind, parts=dict(getattr(merger, "parts", {}) or {}), merger=merger)


def weight_share_agreement(task: Task) -> tuple[int, int]:
    """Of the layered task's layers, how many classify_by_weights (LoraMerger's rule on a model without
    feature-map sizes) puts where the ground truth does: (agreeing, total)."""
    names = sorted(task.truth)
    kinds = classify_by_weights(names, task.content, task.style)
    return sum(kinds[n][0] == task.truth[n] for n in names), len(names)
