"""DiffLoRA: train the LoRA autoencoder (LAE) and the DiT denoiser on a LoRA population, and sample a LoRA from
face and image embeddings (Sections 3.2-3.4, 4.1).

* ``LaeTrainer``: reconstruction MSE + ``wp_weight`` x the weight-preserved loss (Eq. 2) on flat LoRA vectors
  (training/lora_vector.py), AdamW (the paper: lr 2e-5, batch 4).
* ``DiTTrainer``: the x0 objective of Eq. 3 (w_t = 1) on LAE latents divided by their std, timesteps uniform over
  a 1000-step linear beta schedule from 1e-4 to 0.012; each sample's condition is the MIF of a randomly drawn
  reference embedding of the same identity (AdamW, lr 1e-4, batch 32).
* ``DiffLora``: LAE + DiT + layout in one file; ``sample`` runs DDIM (eta 0: deterministic for a seed; 100 steps
  by default) and decodes to LoRA weights.

Each config has two presets (``PRESETS``, ``LaeTrainConfig.preset("paper")``): "small", the dataclass defaults (a
6 x 256 DiT and a 64x LAE, for a CPU and tens of LoRAs; LAE lr 1e-3), and "paper", the sizes of Sec. 4.1 (a 16 x 1454
DiT, an LAE of about 300x compression, lr 2e-5 / batch 4 for the LAE and 1e-4 / 32 for the DiT).

Both trainers run alone, inside a job (``run_in_job``: resume, progress, checkpoints) and under torchrun: every
process draws its own batches (seed + rank) and gradients are averaged, so the weights stay identical on every
process. Pure torch: no ComfyUI.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..models.dit import DiTConfig, LoraDiT
from ..models.lae import LaeConfig, LoraAutoencoder, lae_loss
from .config import Presets, TrainingConfig
from .fileio import atomic_path, read_safetensors
from .lora_format import LoraBundle, LoraWeight
from .lora_trainer import NonFiniteLossError, TrainingInputError
from .lora_vector import LoraLayout

log = logging.getLogger(__name__)
KIND_LAE, KIND_DIFFLORA = "lae", "difflora"
PRESETS = ("small", "paper")  # LaeTrainConfig.preset / DiTTrainConfig.preset: the CPU default, the paper's sizes


class DiffLoraFileError(ValueError):
    """A DiffLoRA / LAE file is unusable; says which file and what to do."""


# -- configs ----------------------------------------------------------------------------------------

@dataclass
class NetTrainConfig(Presets, TrainingConfig):
    """The optimiser settings both DiffLoRA trainers share (AdamW); the defaults are the DiT's. Presets: ``PRESETS``
    (``preset``, ``from_widgets``: training/config.Presets)."""
    steps: int = 5000
    learning_rate: float = 1e-4
    batch_size: int = 32
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    _lr_example: ClassVar[str] = "1e-4"  # the learning rate the message of a bad one suggests
    def validate(self) -> "NetTrainConfig":
        self.need(isinstance(self.steps, int) and self.steps >= 1, "steps", "use a whole number >= 1")
        self.need(math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning_rate",
                  f"use e.g. {self._lr_example}")
        self.need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "use a number >= 1")
        self.need(self.max_grad_norm >= 0, "max_grad_norm", "use a number >= 0 (0 disables clipping)")
        return self


@dataclass
class LaeTrainConfig(NetTrainConfig):
    steps: int = 2000
    learning_rate: float = 1e-3     # small: tens of LoRAs on a CPU; the paper (preset "paper"): 2e-5, batch 4
    batch_size: int = 4
    wp_weight: float = 1.0          # 0: reconstruction only (the paper's "No WP Loss" ablation)
    # the LAE's architecture, by default the model config's (models/lae.py)
    patch: int = LaeConfig.patch
    levels: int = LaeConfig.levels
    channels: int = LaeConfig.channels
    latent_channels: int = LaeConfig.latent_channels
    heads: int = LaeConfig.heads
    mlp_hidden: int = LaeConfig.mlp_hidden

    _lr_example: ClassVar[str] = "2e-5"
    # the paper (Sec. 4.1): AdamW, lr 2e-5, batch 4, a 5-layer encoder, about 300x compression. Compression =
    # patch * 2**(levels-1) / latent_channels, less the padding of L to a multiple of patch * 2**(levels-1):
    # 75 * 16 / 4 = 300. The paper gives no width: channels, heads and the MLP stay the small ones.
    _presets: ClassVar[dict[str, dict]] = {
        "small": {},
        "paper": dict(learning_rate=2e-5, batch_size=4, patch=75, levels=5, latent_channels=4)}

    def validate(self) -> "LaeTrainConfig":
        super().validate()
        self.need(self.wp_weight >= 0, "wp_weight", "use a number >= 0 (0 turns the WP loss off)")
        return self

    def lae_config(self, length: int) -> LaeConfig:
        try:
            return LaeConfig(length, self.patch, self.levels, self.channels, self.latent_channels, self.heads,
                             self.mlp_hidden).validate()
        except ValueError as e:
            raise TrainingInputError(str(e)) from None


@dataclass
class DiTTrainConfig(NetTrainConfig):
    # the DiT's architecture, by default the model config's (models/dit.py)
    hidden: int = DiTConfig.hidden  # the paper: 1454
    depth: int = DiTConfig.depth    # the paper: 16
    heads: int = DiTConfig.heads
    mlp_ratio: float = DiTConfig.mlp_ratio
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.012

    # the paper (Sec. 4.1): "a 16-layer DiT model with 1454 dimensions", AdamW, lr 1e-4, batch 32, 1000 steps of a
    # linear schedule from 1e-4 to 0.012. It gives no head count: 1454 = 2 x 727 with 727 prime, so the only
    # choices are 1, 2, 727 or 1454 heads; 2 heads of 727 is the one closest to DiT's usual 64-128 wide heads
    # (the fused flash-attention kernels take heads up to 256 wide, so attention uses another SDPA kernel).
    _presets: ClassVar[dict[str, dict]] = {
        "small": {},
        "paper": dict(hidden=1454, depth=16, heads=2, mlp_ratio=4.0, learning_rate=1e-4, batch_size=32,
                      timesteps=1000, beta_start=1e-4, beta_end=0.012)}

    def validate(self) -> "DiTTrainConfig":
        super().validate()
        self.need(isinstance(self.timesteps, int) and self.timesteps >= 2, "timesteps", "use e.g. 1000")
        self.need(0 < self.beta_start < self.beta_end < 1, "beta_end", "use 0 < beta_start < beta_end < 1")
        return self


# -- schedule and DDIM ------------------------------------------------------------------------------

class LinearSchedule:
    """DDPM betas linear from ``beta_start`` to ``beta_end`` over ``steps`` (the paper: 1000, 1e-4, 0.012)."""

    def __init__(self, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.012):
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        self.steps = steps
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()

    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(like.device)[t].reshape(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def ddim_timesteps(self, n: int) -> list[int]:
        if not isinstance(n, int) or not 1 <= n <= self.steps:
            raise ValueError(f"DDIM steps = {n!r} is invalid: use a whole number from 1 to {self.steps}")
        return sorted({round(x) for x in torch.linspace(self.steps - 1, 0, n).tolist()}, reverse=True)


@torch.no_grad()
def ddim_sample(net, cond: torch.Tensor, shape: tuple[int, ...], schedule: LinearSchedule, steps: int = 100,
                seed: int = 0, eta: float = 0.0) -> torch.Tensor:
    """DDIM with an x0-predicting ``net(x, t, cond)``. The noise comes from a CPU generator seeded with ``seed``,
    so a seed gives the same sample on any device; eta 0 is deterministic after the first draw."""
    g = torch.Generator().manual_seed(seed)
    device = cond.device
    x = torch.randn(shape, generator=g).to(device)
    ts = schedule.ddim_timesteps(steps)
    abar = schedule.alphas_cumprod
    for i, t in enumerate(ts):
        a_t = float(abar[t])
        a_prev = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        x0 = net(x, torch.full((shape[0],), t, device=device, dtype=torch.long), cond)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        sigma = eta * math.sqrt(max(0.0, (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(0.0, 1 - a_prev - sigma ** 2)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(shape, generator=g).to(device)
    return x


# -- the trainers -----------------------------------------------------------------------------------

def _dist() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _NetTrainer:
    """Steps, AdamW, clipping, gradient averaging across processes, checkpoints and jobs, for one nn.Module."""

    method = ""

    def __init__(self, module: nn.Module, cfg, device: torch.device | str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.rank, self.world = _dist()
        self.module = module.to(self.device)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        self.step, self.losses = 0, []

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def randint(self, high: int, n: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=self.generator)

    def randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(self.device)

    def train_step(self) -> float:
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(self.step + 1, value, self.cfg.learning_rate)
        loss.backward()
        if self.world > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= self.world
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        self.losses.append(value)
        return value

    def run(self, on_step=None):
        with torch.inference_mode(False), torch.enable_grad():
            while self.step < self.cfg.steps:
                value = self.train_step()
                if on_step:
                    on_step(self.step, self.cfg.steps, value)
        self.module.eval()
        return self.module

    def state_dict(self) -> dict:
        return {"module": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "generator": self.generator.get_state(),
                "step": self.step, "losses": list(self.losses), "rank": self.rank, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise TrainingInputError(f"this checkpoint is of process {state['rank']} of {state['world']}; resume "
                                     f"with the same number of processes ({state['world']})")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step, self.losses = int(state["step"]), [float(v) for v in state["losses"]]

    def run_in_job(self, ctx, phase: str) -> None:
        """Resume from the job's checkpoint, report progress, checkpoint every N steps and on cancel / failure."""
        state = ctx.load_checkpoint()
        if state is not None and state.get("phase", phase) == phase:
            self.load_state_dict(state)
            ctx.rewind(self.step)
        with torch.inference_mode(False), torch.enable_grad():
            try:
                while self.step < self.cfg.steps:
                    ctx.token.raise_if_cancelled()
                    value = self.train_step()
                    ctx.progress(self.step, self.cfg.steps, value, phase)
                    if ctx.checkpoint_due(self.step):
                        ctx.save_checkpoint(self.state_dict(), phase)
            except BaseException:
                ctx.save_checkpoint(self.state_dict(), phase)
                raise
        self.module.eval()


class LaeTrainer(_NetTrainer):
    method = "difflora_lae"

    def __init__(self, vectors: torch.Tensor, cfg: LaeTrainConfig, device: torch.device | str = "cpu"):
        cfg.validate()
        if vectors.ndim != 2 or vectors.shape[0] < 1:
            raise TrainingInputError(f"the LAE trains on (identities, length) LoRA vectors, got "
                                     f"{tuple(vectors.shape)}: build a LoRA dataset first")
        with _seeded(cfg.seed):
            lae = LoraAutoencoder(cfg.lae_config(int(vectors.shape[1])))
        mean = vectors.float().mean(0)
        scale = float((vectors.float() - mean).std()) if vectors.numel() > 1 else 0.0
        lae.weight_mean.copy_(mean)
        lae.weight_scale.fill_(scale if scale > 0 else float(vectors.float().abs().mean()) or 1.0)
        super().__init__(lae, cfg, device)
        self.vectors = vectors.float().to(self.device)

    def loss(self) -> torch.Tensor:
        x = self.vectors[self.randint(len(self.vectors), self.cfg.batch_size).to(self.device)]
        return lae_loss(x, self.module(x), self.module.weight_scale, self.cfg.wp_weight)

    @torch.no_grad()
    def report(self) -> dict:
        """Compression ratio and reconstruction errors over the whole population."""
        self.module.eval()
        x = self.vectors
        x_hat = torch.cat([self.module(x[i:i + 16]) for i in range(0, len(x), 16)])
        rel = ((x_hat - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-12))
        return {"compression": self.module.cfg.compression, "latent_shape": list(self.module.cfg.latent_shape),
                "length": self.module.cfg.length, "mse": float(F.mse_loss(x_hat, x)),
                "relative_error_mean": float(rel.mean()), "relative_error_max": float(rel.max())}


class DiTTrainer(_NetTrainer):
    """x0 objective on normalized LAE latents, conditioned on MIF features of a random reference of the identity."""

    method = "difflora_dit"

    def __init__(self, latents: torch.Tensor, face: list[torch.Tensor], image: list[torch.Tensor],
                 cfg: DiTTrainConfig, device: torch.device | str = "cpu"):
        cfg.validate()
        n = len(latents)
        if not (n == len(face) == len(image)) or n < 1:
            raise TrainingInputError(f"{n} latents, {len(face)} face and {len(image)} image embedding sets: give "
                                     f"one of each per identity")
        empty = [i for i in range(n) if len(face[i]) == 0 or len(image[i]) == 0]
        if empty:
            raise TrainingInputError(f"identities {empty[:5]} have no face or no image embedding: rebuild them with "
                                     f"images that show a face")
        self.schedule = LinearSchedule(cfg.timesteps, cfg.beta_start, cfg.beta_end)
        with _seeded(cfg.seed):
            dit = LoraDiT(DiTConfig(int(latents.shape[1]), int(latents.shape[2]), int(face[0].shape[1]),
                                    int(image[0].shape[1]), cfg.hidden, cfg.depth, cfg.heads, cfg.mlp_ratio))
        super().__init__(dit, cfg, device)
        self.latents = latents.float().to(self.device)
        self.face = [f.float().to(self.device) for f in face]
        self.image = [e.float().to(self.device) for e in image]

    def references(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pick = lambda sets, i: sets[i][int(self.randint(len(sets[i]), 1))]  # noqa: E731
        return (torch.stack([pick(self.face, int(i)) for i in ids]),
                torch.stack([pick(self.image, int(i)) for i in ids]))

    def loss(self) -> torch.Tensor:
        ids = self.randint(len(self.latents), self.cfg.batch_size)
        x0 = self.latents[ids.to(self.device)]
        face, image = self.references(ids)
        t = self.randint(self.schedule.steps, len(ids)).to(self.device)
        x_t = self.schedule.add_noise(x0, t, self.randn(x0.shape))
        return F.mse_loss(self.module(x_t, t, self.module.condition(face, image)), x0)


# -- the DiffLoRA model and its files -----------------------------------------------------------------

class DiffLora(nn.Module):
    """A trained LAE + DiT and the layout they were trained on: embeddings in, LoRA weights out."""

    def __init__(self, layout: LoraLayout, lae: LoraAutoencoder, dit: LoraDiT | None, latent_scale: float,
                 schedule: dict, meta: dict):
        super().__init__()
        self.layout, self.lae, self.dit = layout, lae, dit
        self.latent_scale, self.schedule_cfg, self.meta = float(latent_scale), dict(schedule), dict(meta)
        self.schedule = LinearSchedule(**self.schedule_cfg)

    @torch.no_grad()
    def sample_latents(self, face: torch.Tensor, image: torch.Tensor, steps: int = 100, seed: int = 0,
                       eta: float = 0.0) -> torch.Tensor:
        if self.dit is None:
            raise DiffLoraFileError("this file holds only a LoRA autoencoder: train the DiT on it (IDLoRA Train "
                                    "DiffLoRA) and load the file that job writes")
        device = next(self.dit.parameters()).device
        cond = self.dit.condition(face.float().to(device), image.float().to(device))
        shape = (face.shape[0], self.dit.cfg.in_channels, self.dit.cfg.tokens)
        return ddim_sample(self.dit, cond, shape, self.schedule, steps, seed, eta)

    @torch.no_grad()
    def sample(self, face: torch.Tensor, image: torch.Tensor, steps: int = 100, seed: int = 0,
               eta: float = 0.0) -> list[dict[str, LoraWeight]]:
        """One LoRA (module path -> LoraWeight) per row of ``face`` / ``image``."""
        vectors = self.lae.decode(self.sample_latents(face, image, steps, seed, eta) * self.latent_scale)
        return [self.layout.unflatten(v.float().cpu()) for v in vectors]

    def bundle(self, weights: dict[str, LoraWeight], extra: dict | None = None,
               stems: dict[str, str] | None = None) -> LoraBundle:
        """A sampled LoRA as a bundle; ``stems``: the base model's file stems (its ``lora_stems``)."""
        rank = self.layout.layers[0].rank
        meta = {"idlora_method": "difflora", "idlora_base_model": self.meta.get("base_model", ""),
                "idlora_targets": self.meta.get("targets", ""), "idlora_ranks": json.dumps({"rank": rank}),
                "ss_network_dim": str(rank), "ss_network_alpha": str(self.layout.layers[0].alpha or rank),
                **(extra or {})}
        return LoraBundle(weights=weights, metadata=meta, key_style="module", stems=dict(stems or {}))


def encode_population(lae: LoraAutoencoder, vectors: torch.Tensor, batch: int = 16) -> torch.Tensor:
    lae.eval()
    with torch.no_grad():
        device = lae.weight_scale.device
        return torch.cat([lae.encode(vectors[i:i + batch].float().to(device)).cpu()
                          for i in range(0, len(vectors), batch)])


def save_difflora(path: str | Path, layout: LoraLayout, lae: LoraAutoencoder, dit: LoraDiT | None = None,
                  latent_scale: float = 1.0, schedule: dict | None = None, meta: dict | None = None) -> str:
    """One safetensors file: ``lae.*`` (and ``dit.*``), with the layout and configs in its metadata. Atomic."""
    tensors = {f"lae.{k}": v.detach().float().cpu().contiguous() for k, v in lae.state_dict().items()}
    header = {"idlora_kind": KIND_DIFFLORA if dit is not None else KIND_LAE, "idlora_layout": layout.to_json(),
              "idlora_lae_config": json.dumps(lae.cfg.to_dict()), "idlora_meta": json.dumps(meta or {})}
    if dit is not None:
        tensors.update({f"dit.{k}": v.detach().float().cpu().contiguous() for k, v in dit.state_dict().items()})
        header.update(idlora_dit_config=json.dumps(dit.cfg.to_dict()), idlora_latent_scale=repr(float(latent_scale)),
                      idlora_schedule=json.dumps(schedule or {}))
    final = str(Path(path).absolute())
    Path(final).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as tmp:
        save_file(tensors, tmp, metadata=header)
    return final


def load_difflora(path: str | Path, device: torch.device | str = "cpu") -> DiffLora:
    """An LAE file (``dit`` None) or a full DiffLoRA file."""
    path = Path(path)
    if not path.is_file():
        raise DiffLoraFileError(f"the DiffLoRA file {path} does not exist: put it in models/difflora or train one "
                                f"(IDLoRA Train LoRA Autoencoder, then IDLoRA Train DiffLoRA)")
    tensors, header = read_safetensors(path, DiffLoraFileError, ": train it again")
    if header.get("idlora_kind") not in (KIND_LAE, KIND_DIFFLORA):
        raise DiffLoraFileError(f"{path} is not a DiffLoRA or LAE file (no idlora_kind in its metadata): pick a file "
                                f"written by IDLoRA Train LoRA Autoencoder or IDLoRA Train DiffLoRA")
    lae = LoraAutoencoder(_file_config(path, header, "idlora_lae_config", LaeConfig))
    lae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("lae.")})
    dit, scale, schedule = None, 1.0, {}
    if header["idlora_kind"] == KIND_DIFFLORA:
        dit = LoraDiT(_file_config(path, header, "idlora_dit_config", DiTConfig))
        dit.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("dit.")})
        scale, schedule = float(header["idlora_latent_scale"]), json.loads(header["idlora_schedule"])
    model = DiffLora(LoraLayout.from_json(header["idlora_layout"]), lae, dit, scale, schedule,
                     json.loads(header.get("idlora_meta", "{}")))
    return model.to(device).eval()


def _file_config(path: Path, header: dict, key: str, cls):
    """A file's LAE / DiT config, read strictly. Every version so far wrote exactly the fields of LaeConfig /
    DiTConfig (``cfg.to_dict()``), so there are no retired keys to drop; a key a config no longer has must be listed
    and dropped here, never ignored by ``from_dict``."""
    try:
        return cls.from_dict(json.loads(header[key]))
    except (ValueError, KeyError) as e:
        raise DiffLoraFileError(f"{path}: its {key} does not fit this version of IDLoRA ({e}): train it "
                                f"again") from None


def schedule_of(cfg: DiTTrainConfig) -> dict:
    return {"steps": cfg.timesteps, "beta_start": cfg.beta_start, "beta_end": cfg.beta_end}
