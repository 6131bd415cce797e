"""Meta-LoRA (Meta-LoRA: Meta-Learning LoRA Components for Domain-Aware ID Personalization).

Stage 1 (Algorithm 1) meta-trains the shared Meta-Down over many identities. Identities are grouped into buckets;
each bucket runs for ``q_bucket`` iterations (by default so that each of its images is used about 10 times). In
the first ``q_warmup = 0.4 q_bucket`` iterations only the Mid and Up of the bucket's identities learn, syncing them
with the current Meta-Down; then everything does. The Mid / Up of identities outside the bucket stay in CPU
memory, so thousands of identities fit. Under torch.distributed every rank trains its own identities and the
Meta-Down gradients are averaged across ranks (a data-parallel all-reduce: Mid / Up are rank-local, which is why
the DDP wrapper, which would synchronise every parameter, is not used).

Stage 2 (Algorithm 2) fits one Mid / Up pair to one photo's augmented crops with Meta-Down frozen, and collapses
it exactly to a standard rank-r2 LoRA (lora_down = mid @ meta_down, lora_up = up, alpha = r2).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from ..models.lora import LoraConfigError
from ..models.meta_lora import MetaLoraNetwork, check_ranks
from .diffusion import Cond, DiffusionModel, lora_key_map, lora_stems
from .fileio import atomic_path, read_safetensors
from .lora_format import LoraBundle, LoraWeight
from .config import Presets
from .lora_trainer import BASE_MODEL_VERSIONS, LoraTrainConfig, LoraTrainer, TrainingInputError

PROMPT_TEMPLATES = ("a photo of {}", "a close-up photo of {}", "a portrait of {}", "a picture of {}",
                    "a cropped photo of {}", "a good photo of {}")
META_DOWN_METHOD = "meta_lora_down"
# stage 2's methods: Meta-LoRA (Mid / Up on the frozen Meta-Down), and the paper's baseline "LoRA + augmented inputs"
# (a plain rank-r2 LoRA on the same crops and layers)
STAGE2_METHODS = ("meta_lora", "lora_aug")
log = logging.getLogger(__name__)


class MetaDownError(ValueError):
    """A Meta-Down file that does not fit; the message names the file, what differs and the fix."""


def identity_prompts(class_word: str, n: int, token: str = "sks", templates=PROMPT_TEMPLATES,
                     seed: int = 0) -> list[str]:
    """n prompts from the templates, each about ``<token> <class word>`` (seeded choice)."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(templates), (n,), generator=g).tolist()
    return [templates[i].format(f"{token} {class_word}".strip()) for i in picks]


# -- data ------------------------------------------------------------------------------------

@dataclass
class IdentitySet:
    """Stage-1 data: every image's latent (one size), its conditioning row, and the identity it belongs to."""
    names: list[str]
    latents: torch.Tensor      # (N_img, C, h, w)
    cond: Cond                 # rows per image
    owner: torch.Tensor        # (N_img,) identity index

    def __post_init__(self):
        counts = torch.bincount(self.owner, minlength=len(self.names))
        empty = [self.names[i] for i in range(len(self.names)) if counts[i] == 0]
        if empty:
            raise TrainingInputError(f"identities {empty} have no images: every identity folder needs at least one "
                                     f"image (.jpg, .png, .webp)")

    @property
    def device(self) -> torch.device:
        return self.latents.device

    def images_of(self, ids: list[int]) -> torch.Tensor:
        return torch.nonzero(torch.isin(self.owner, torch.tensor(ids)), as_tuple=True)[0]


@dataclass
class CropData:
    """Stage-2 data: latents of different sizes (one per augmented crop), with a conditioning row each."""
    latents: list[torch.Tensor]   # (1, C, h_i, w_i)
    conds: list[Cond]

    def __len__(self) -> int:
        return len(self.latents)

    @property
    def device(self) -> torch.device:
        return self.latents[0].device

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, Cond]:
        if idx.numel() != 1:
            raise TrainingInputError(f"batch_size = {idx.numel()} with crops of different sizes: use batch_size 1 "
                                     f"(Meta-LoRA stage 2 uses 1)")
        i = int(idx[0])
        return self.latents[i], self.conds[i]


# -- configs --------------------------------------------------------------------------------

@dataclass
class MetaLoraConfig(LoraTrainConfig):
    """The defaults both Meta-LoRA stages share; ``rank`` is r2 (Mid's output)."""
    learning_rate: float = 4e-4
    rank: int = 1


@dataclass
class MetaStage1Config(Presets, MetaLoraConfig):
    """``steps`` is q_total. Presets (``MetaStage1Config.preset(name)``): "small", the defaults below (a CPU and a
    handful of identities), and "paper", the paper's settings."""
    steps: int = 2000
    batch_size: int = 4
    r1: int = 128
    identities_per_bucket: int = 8
    bucket_steps: int = 0              # q_bucket; 0: each image of a bucket is used about `uses_per_image` times
    uses_per_image: float = 10.0
    warmup_fraction: float = 0.4       # q_warmup = warmup_fraction * q_bucket

    # the paper (Sec. 3, 4.2, App. B.1): q_total 50,000, q_bucket 2,500, q_warm-up 1,000 = 0.4 q_bucket, lr 4e-4,
    # batch 4, r1 128, r2 1. It gives the bucket size in iterations, not in identities: each image of a bucket is
    # used 10 times (Sec. 3) and every identity has 20 images (Sec. 4.2), so a bucket holds 2,500 x 4 / (10 x 20) = 50
    # identities (its 1,050 female identities: 21 buckets, 52,500 iterations, about q_total).
    _presets: ClassVar[dict[str, dict]] = {
        "small": {},
        "paper": dict(steps=50000, bucket_steps=2500, identities_per_bucket=50, warmup_fraction=0.4,
                      uses_per_image=10.0, learning_rate=4e-4, batch_size=4, r1=128, rank=1)}

    def validate(self) -> "MetaStage1Config":
        super().validate()
        try:
            check_ranks(self.r1, self.rank)
        except LoraConfigError as e:
            raise TrainingInputError(str(e)) from None
        if self.precision == "fp16":
            raise TrainingInputError("precision = 'fp16' is not supported by Meta-LoRA: use auto, bf16 or fp32")
        self.need(self.identities_per_bucket >= 1, "identities_per_bucket", "use a whole number >= 1")
        self.need(self.bucket_steps >= 0, "bucket_steps", "use 0 (automatic) or a whole number >= 1")
        self.need(self.uses_per_image > 0, "uses_per_image", "use a number > 0 (the paper: 10)")
        self.need(0 <= self.warmup_fraction < 1, "warmup_fraction", "use a fraction 0 <= f < 1 (the paper: 0.4)")
        return self


STAGE1_PRESETS = tuple(MetaStage1Config._presets)  # "small" (the CPU default), "paper"


@dataclass
class MetaStage2Config(MetaLoraConfig):
    """Stage 2: Mid and Up only. Defaults (with MetaLoraConfig's) from the paper's B.1."""
    steps: int = 375
    batch_size: int = 1


# -- Meta-Down files ------------------------------------------------------------------------------

def save_meta_down(path: str | Path, network: MetaLoraNetwork, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file
    tensors = {f"{n}.meta_down": network.meta_down[k].detach().float().cpu().contiguous()
               for n, k in zip(network.names, network.meta_down.keys())}
    meta = dict(metadata, idlora_method=META_DOWN_METHOD, idlora_r1=str(network.r1),
                idlora_modules=json.dumps({n: list(t.shape) for n, t in tensors.items()}))
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_meta_down(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({module name: meta-down weight}, metadata) of a Meta-Down file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Meta-Down file {path} does not exist: train one with IDLoRA Meta-LoRA Stage 1, or "
                                f"put it in models/idlora/meta_down/")
    tensors, meta = read_safetensors(path, MetaDownError, "", keep=lambda k: k.endswith(".meta_down"))
    weights = {k[:-len(".meta_down")]: v for k, v in tensors.items()}
    if meta.get("idlora_method") != META_DOWN_METHOD or not weights:
        raise MetaDownError(f"{path} is not a Meta-Down file (method {meta.get('idlora_method')!r}, "
                            f"{len(weights)} meta-down tensors): a plain LoRA cannot be used as a Meta-Down")
    r1s = {int(t.shape[0]) for t in weights.values()}
    if len(r1s) != 1 or str(r1s.pop()) != meta.get("idlora_r1"):
        raise MetaDownError(f"{path}: its tensors' rank disagrees with its metadata r1 = {meta.get('idlora_r1')}; "
                            f"the file is damaged: train it again")
    return weights, meta


def check_meta_down(weights: dict[str, torch.Tensor], meta: dict[str, str], model: DiffusionModel,
                    source: str = "the Meta-Down", r1: int | None = None) -> dict[str, nn.Module]:
    """The target modules of ``model`` the Meta-Down was trained on; MetaDownError naming what does not fit."""
    base = meta.get("idlora_base_model", "?")
    if base != model.name:
        raise MetaDownError(f"{source} was trained on base model {base!r}, this model is {model.name!r}: use a "
                            f"Meta-Down trained on this base model")
    if r1 is not None and int(meta["idlora_r1"]) != r1:
        raise MetaDownError(f"{source} has rank r1 = {meta['idlora_r1']}, the settings ask for r1 = {r1}: set r1 to "
                            f"{meta['idlora_r1']} or train a Meta-Down with r1 = {r1}")
    modules = dict(model.denoiser.named_modules())
    missing = [n for n in weights if n not in modules]
    bad = [(n, tuple(w.shape[1:]), tuple(modules[n].weight.shape[1:])) for n, w in weights.items()
           if n in modules and tuple(w.shape[1:]) != tuple(modules[n].weight.shape[1:])]
    if missing or bad:
        detail = f"{len(missing)} of its modules are missing (e.g. {missing[:1]})" if missing else \
            f"input shapes differ (e.g. {bad[0][0]}: {bad[0][1]} vs {bad[0][2]})"
        raise MetaDownError(f"{source} does not fit this model: {detail}. It was made for another architecture; "
                            f"train a Meta-Down for this checkpoint")
    return {n: modules[n] for n in weights}


# -- stage 2 ---------------------------------------------------------------------------------------

def match_init_lora(bundle: LoraBundle, targets: dict[str, nn.Module], meta_down: dict[str, torch.Tensor],
                    r2: int, source: str = "init_lora", key_map: dict[str, str] | None = None
                    ) -> dict[str, LoraWeight]:
    """{target module name: LoraWeight} of a LoRA to start stage 2 from; TrainingInputError naming what differs.

    The LoRA must have exactly the Meta-Down's layers (its keys may be module paths or kohya / diffusers stems, as
    ``lora_format.resolve`` reads them, plus ``key_map``: file stem -> module path, e.g. ``lora_key_map(model)``
    for the stems IDLoRA saves on SD1.x), rank r2 on every layer, and each layer's shapes must be the Meta-Down's
    input shape and the layer's output size."""
    if not isinstance(bundle, LoraBundle) or not bundle.weights:
        raise TrainingInputError(f"{source} is not a LoRA with layers (got {type(bundle).__name__}): connect a LoRA "
                                 f"(e.g. from IDLoRA DiffLoRA Sample or IDLoRA Load LoRA), or leave it unconnected")
    from .lora_format import resolve
    shapes = {n: tuple(m.weight.shape) for n, m in targets.items()}
    resolved, report = resolve(bundle, shapes, key_map)
    if report.shape_mismatch:
        stem, got, want = report.shape_mismatch[0]
        raise TrainingInputError(f"{source} layer {stem!r} has delta shape {tuple(got)}, the model's layer has "
                                 f"{tuple(want)} ({len(report.shape_mismatch)} such layers): use a LoRA made for "
                                 f"this base model")
    if report.missing:
        raise TrainingInputError(f"{source} has {len(report.missing)} layers the Meta-Down does not train (e.g. "
                                 f"{report.missing[0]!r}): use a LoRA with the Meta-Down's targets "
                                 f"({len(targets)} layers) only, or leave init_lora unconnected")
    absent = [n for n in sorted(targets) if n not in resolved]
    if absent:
        raise TrainingInputError(f"{source} lacks {len(absent)} of the Meta-Down's {len(targets)} layers (e.g. "
                                 f"{absent[0]!r}): use a LoRA trained on the same targets as the Meta-Down, or "
                                 f"leave init_lora unconnected")
    out = {}
    for name in sorted(targets):
        w, md = resolved[name], meta_down[name]
        if w.rank != r2:
            raise TrainingInputError(f"{source} layer {name!r} has rank {w.rank}, r2 = {r2}: set r2 to {w.rank}, or "
                                     f"use a LoRA of rank {r2}")
        if tuple(w.down.shape[1:]) != tuple(md.shape[1:]) and w.down[0].numel() != md[0].numel():
            raise TrainingInputError(f"{source} layer {name!r} has down shape {tuple(w.down.shape)}, the Meta-Down "
                                     f"{tuple(md.shape)}: their input sizes differ; use a LoRA made for this model")
        out[name] = LoraWeight(w.down.reshape(w.rank, *md.shape[1:]), w.up, w.alpha)
    return out


@torch.no_grad()
def init_from_lora(network: MetaLoraNetwork, weights: dict[str, LoraWeight], slot: int = 0) -> dict:
    """Set one slot's Mid / Up so that its collapsed LoRA is the given LoRA projected onto the Meta-Down's row space.

    With the given layer ``delta = s U D`` (s = alpha / rank) and the collapse ``delta = Up Mid MD`` (alpha = r2,
    scale 1): ``Up = s U`` and ``Mid = D pinv(MD)`` (least squares), so ``Mid MD = D P`` with P the projection
    onto the row space of MD. The start equals the given LoRA exactly when every D lies in that row space (e.g. a
    LoRA collapsed from the same Meta-Down), otherwise it is its projection. ``weights`` comes from
    ``match_init_lora``. Returns {"layers", "delta_error", "down_error", "worst_layer"}: the relative Frobenius
    errors of all deltas together and of the worst layer's down."""
    from ..models.lora import _key
    num = den = 0.0
    worst, worst_name = 0.0, ""
    for name in network.names:
        k, w = _key(name), weights[name]
        md = network.meta_down[k].detach().double().cpu().flatten(1)           # (r1, d_in)
        d = w.down.detach().double().cpu().reshape(w.rank, -1)                   # (r2, d_in)
        u = w.up.detach().double().cpu().reshape(w.up.shape[0], w.rank) * w.scale
        mid = d @ torch.linalg.pinv(md)                                          # (r2, r1)
        rest = d - mid @ md
        num += float((u @ rest).square().sum())
        den += float((u @ d).square().sum())
        dn = float(d.norm())
        err = float(rest.norm()) / dn if dn > 0 else 0.0
        if err >= worst:
            worst, worst_name = err, name
        network.mid[k][slot] = mid.to(network.mid[k].dtype).to(network.mid[k].device)
        network.up[k][slot] = u.to(network.up[k].dtype).to(network.up[k].device)
    delta_error = math.sqrt(num / den) if den > 0 else worst
    return {"layers": len(network.names), "delta_error": delta_error, "down_error": worst, "worst_layer": worst_name}


class MetaLoraPersonalizer(LoraTrainer):
    """Stage 2: Mid and Up of one identity on the crops of one photo; Meta-Down frozen.

    ``init_lora`` (optional, rank r2, the Meta-Down's layers): start from that LoRA instead of a fresh Mid and a
    zero Up, e.g. to refine a DiffLoRA-sampled LoRA. The start is its projection onto the Meta-Down's row space
    (exact when its downs lie there); ``init_report`` says how far off the projection is (see ``init_from_lora``).
    """

    method = "meta_lora"

    def __init__(self, model: DiffusionModel, data: CropData, config: MetaStage2Config,
                 meta_down: dict[str, torch.Tensor], meta: dict[str, str], init_lora: LoraBundle | None = None):
        self.meta_down_weights, self.meta_down_meta = meta_down, meta
        self._targets = check_meta_down(meta_down, meta, model)
        self.init_weights = None if init_lora is None else \
            match_init_lora(init_lora, self._targets, meta_down, config.rank, key_map=lora_key_map(model))
        self.init_report: dict | None = None
        super().__init__(model, data, config)

    def target_modules(self) -> dict[str, nn.Module]:
        """The Meta-Down's layers (its file says which), whatever ``cfg.targets`` says."""
        return self._targets

    def build_network(self, targets) -> MetaLoraNetwork:
        r1 = int(self.meta_down_meta["idlora_r1"])
        net = MetaLoraNetwork(self._targets, r1, self.cfg.rank, slots=1, seed=self.cfg.seed)
        with torch.no_grad():
            for name, k in zip(net.names, net.meta_down.keys()):
                net.meta_down[k].copy_(self.meta_down_weights[name])
        net.meta_down.requires_grad_(False)
        if self.init_weights is not None:
            self.init_report = init_from_lora(net, self.init_weights)
            r = self.init_report
            log.info("Meta-LoRA stage 2 starts from init_lora: %d layers, relative projection error of the delta "
                     "%.2e (worst down %.2e at %s)", r["layers"], r["delta_error"], r["down_error"], r["worst_layer"])
        return net

    def alphas(self) -> dict[str, float]:
        return {n: float(self.cfg.rank) for n in self.network.names}

    def metadata(self) -> dict[str, str]:
        meta = super().metadata()
        meta.update(idlora_ranks=json.dumps({"r1": self.network.r1, "r2": self.cfg.rank}),
                    idlora_targets=self.meta_down_meta.get("idlora_targets", ""),
                    idlora_meta_down=self.meta_down_meta.get("idlora_name", ""))
        if self.init_report is not None:
            meta["idlora_init_lora"] = json.dumps(self.init_report)
        return meta

    def bundle(self) -> LoraBundle:
        weights = {n: LoraWeight(d, u, a) for n, (d, u, a) in self.network.collapse(0).items()}
        return LoraBundle(weights=weights, metadata=self.metadata(), key_style="module", stems=lora_stems(self.model))


class LoraAugTrainer(LoraTrainer):
    """The paper's baseline "rank-1 LoRA + augmented inputs" (Tables 1, 3, 4): a plain rank-r2 LoRA (Down and Up both
    train; Down kaiming, Up zero, alpha = rank) on the same face-centred crops as stage 2, with stage 2's settings. By
    default on the Meta-Down's layers (``targets``, e.g. ``check_meta_down``'s), so that the two methods adapt the same
    layers; without them, on ``cfg.targets``."""

    method = "lora_aug"

    def __init__(self, model: DiffusionModel, data: CropData, config: MetaStage2Config,
                 targets: dict[str, nn.Module] | None = None):
        self._targets = targets
        super().__init__(model, data, config)

    def target_modules(self) -> dict[str, nn.Module]:
        return self._targets if self._targets is not None else super().target_modules()


def stage2_trainer(method: str, model: DiffusionModel, data: CropData, config: MetaStage2Config,
                   meta_down: dict[str, torch.Tensor], meta: dict[str, str],
                   init_lora: LoraBundle | None = None) -> LoraTrainer:
    """Stage 2 by ``method`` (``STAGE2_METHODS``): ``MetaLoraPersonalizer``, or ``LoraAugTrainer`` on the Meta-Down's
    layers (its weights are not used)."""
    if method == "meta_lora":
        return MetaLoraPersonalizer(model, data, config, meta_down, meta, init_lora=init_lora)
    if method != "lora_aug":
        raise TrainingInputError(f"method = {method!r} is invalid: use one of {STAGE2_METHODS}")
    if init_lora is not None:
        raise TrainingInputError("init_lora is connected, but method = 'lora_aug' (the plain LoRA baseline) always "
                                 "starts from scratch: set method to 'meta_lora', or leave init_lora unconnected")
    return LoraAugTrainer(model, data, config, check_meta_down(meta_down, meta, model))


# -- stage 1 -----------------------------------------------------------------------------------------

def _dist() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


class MetaLoraStage1(LoraTrainer):
    """Algorithm 1 with buckets, warm-up, identities off the device, and data parallelism over ranks."""

    method = "meta_lora_stage1"

    def __init__(self, model: DiffusionModel, data: IdentitySet, config: MetaStage1Config):
        self.rank, self.world = _dist()
        self.my_ids = list(range(len(data.names)))[self.rank::self.world]
        if not self.my_ids:
            raise TrainingInputError(f"{len(data.names)} identities for {self.world} processes: every process needs at "
                                     f"least one identity; use fewer processes")
        super().__init__(model, data, config)
        n = min(config.identities_per_bucket, len(self.my_ids))
        images_per_id = len(data.owner) / len(data.names)  # the global mean: every rank gets the same q_bucket
        self.q_bucket = config.bucket_steps or max(1, math.ceil(config.uses_per_image * n * images_per_id /
                                                                config.batch_size))
        self.q_warmup = int(config.warmup_fraction * self.q_bucket)
        self.store: dict[int, dict[str, torch.Tensor]] = {}  # identity -> its Mid / Up, on the CPU
        self.bucket_index, self.in_bucket = 0, 0
        self.bucket: list[int] = []
        self.id_optimizer: torch.optim.Optimizer | None = None
        self.warmup_log: list[tuple[int, bool]] = []
        self.warm = False

    def build_network(self, targets) -> MetaLoraNetwork:
        slots = min(self.cfg.identities_per_bucket, len(self.my_ids))
        return MetaLoraNetwork(targets, self.cfg.r1, self.cfg.rank, slots=slots, seed=self.cfg.seed)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.network.shared_parameters()  # self.optimizer: Meta-Down; the bucket's optimizer: Mid / Up

    def alphas(self) -> dict[str, float]:
        return {n: float(self.cfg.rank) for n in self.network.names}

    # -- buckets ---------------------------------------------------------------------------------
    def bucket_ids(self, index: int) -> list[int]:
        n = self.network.n_slots
        groups = math.ceil(len(self.my_ids) / n)
        cycle, pos = divmod(index, groups)
        g = torch.Generator().manual_seed(self.cfg.seed * 1000003 + cycle * 7919 + self.rank)
        order = [self.my_ids[i] for i in torch.randperm(len(self.my_ids), generator=g).tolist()]
        return order[pos * n:(pos + 1) * n]

    def enter_bucket(self) -> None:
        self.bucket = self.bucket_ids(self.bucket_index)
        gen = torch.Generator().manual_seed(self.cfg.seed + 17)
        for slot, ident in enumerate(self.bucket):
            if ident in self.store:
                self.network.load_slot_state(slot, self.store[ident])
            else:
                gen.manual_seed(self.cfg.seed * 7 + ident)
                self.network.init_slot(slot, gen)
        self.id_optimizer = torch.optim.AdamW(self.network.identity_parameters(), lr=self.cfg.learning_rate,
                                              weight_decay=self.cfg.weight_decay)

    def leave_bucket(self) -> None:
        for slot, ident in enumerate(self.bucket):
            self.store[ident] = self.network.slot_state(slot)
        self.bucket_index, self.in_bucket = self.bucket_index + 1, 0

    def sample_batch(self):
        g, b = self.generator, self.cfg.batch_size
        pool = self.data.images_of(self.bucket)
        idx = pool[torch.randint(0, len(pool), (b,), generator=g)]
        x0, cond = self.data.latents[idx], {k: v[idx] for k, v in self.data.cond.items()}
        slots = torch.tensor([self.bucket.index(int(o)) for o in self.data.owner[idx]])
        self.network.set_slots(slots)
        self.batch_idx = idx
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        return x0, cond, noise, self.sample_sigmas(b, tuple(x0.shape[-2:])).to(x0.device)

    # -- one step (LoraTrainer.train_step's pieces) -----------------------------------------------------
    def before_step(self) -> None:
        if self.in_bucket == 0:
            self.enter_bucket()
        self.warm = self.in_bucket < self.q_warmup  # the warm-up trains only Mid / Up
        self.network.meta_down.requires_grad_(not self.warm)

    def zero_grad(self) -> None:
        super().zero_grad()
        self.id_optimizer.zero_grad(set_to_none=True)

    def update_groups(self):
        """The bucket's Mid / Up, and after the warm-up the Meta-Down, clipped separately: the shared gradient is
        equal on every rank and must stay so."""
        groups = [(self.id_optimizer, self.network.identity_parameters())]
        return groups if self.warm else groups + [(self.optimizer, self.network.shared_parameters())]

    def reduce_gradients(self) -> None:
        if not self.warm:
            self.all_reduce_shared()

    def after_step(self) -> None:
        self.warmup_log.append((self.step, self.warm))
        self.in_bucket += 1
        if self.in_bucket >= self.q_bucket:
            self.leave_bucket()

    def all_reduce_shared(self) -> None:
        if self.world == 1:
            return
        for p in self.network.shared_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= self.world

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.in_bucket:  # the bucket's current Mid / Up, so that a resume continues inside the bucket
            for slot, ident in enumerate(self.bucket):
                self.store[ident] = self.network.slot_state(slot)
        state = super().state_dict()
        state.update(store={str(k): v for k, v in self.store.items()}, bucket_index=self.bucket_index,
                     in_bucket=self.in_bucket, q_bucket=self.q_bucket, rank=self.rank, world=self.world,
                     id_optimizer=self.id_optimizer.state_dict() if self.id_optimizer and self.in_bucket else None)
        return state

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise TrainingInputError(f"this checkpoint is of process {state['rank']} of {state['world']}; resume with "
                                     f"the same number of processes ({state['world']})")
        super().load_state_dict(state)
        self.store = {int(k): v for k, v in state["store"].items()}
        self.bucket_index, self.in_bucket, self.q_bucket = state["bucket_index"], state["in_bucket"], state["q_bucket"]
        if self.in_bucket:
            self.enter_bucket()
            if state.get("id_optimizer"):
                self.id_optimizer.load_state_dict(state["id_optimizer"])

    def output(self) -> MetaLoraNetwork:
        """Stage 1's product is the Meta-Down (save it with ``save_meta_down``), not a LoRA."""
        return self.network

    def meta_down_metadata(self, name: str = "") -> dict[str, str]:
        return {"idlora_base_model": self.model.name, "idlora_targets": self.cfg.targets, "idlora_name": name,
                "idlora_steps": str(self.step), "idlora_identities": str(len(self.data.names)),
                "idlora_config": json.dumps({k: v for k, v in vars(self.cfg).items()}),
                "ss_base_model_version": BASE_MODEL_VERSIONS.get(self.model.name, self.model.name)}


def collapse_check(network: MetaLoraNetwork, slot: int = 0) -> dict[str, LoraWeight]:
    """The collapsed LoRA of one slot as LoraWeights (for saving or comparing)."""
    return {n: LoraWeight(d, u, a) for n, (d, u, a) in network.collapse(slot).items()}

