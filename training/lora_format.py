"""The IDLoRA LoRA file format: save, load, resolve onto a model, atomic writes.

One module owns every LoRA file detail of the project:

* ``save_lora`` writes kohya-style ``.safetensors`` files (``lora_unet_<name>``
  stems with ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``), the
  layout ComfyUI, A1111, kohya's scripts and diffusers all read. The stem of a
  module is what kohya writes for the base model: a ``stems`` map (module path
  -> stem, from the model, e.g. diffusers-layout names for SD1.x/SD2.x) when
  given, else the module path itself (SGM/LDM names, kohya's SDXL convention).
* ``load_lora`` reads kohya, ComfyUI-native (``diffusion_model.<path>``) and
  peft/diffusers (``lora_A``/``lora_B`` and friends) files into a ``LoraBundle``,
  with alpha from ``.alpha`` keys or diffusers' ``lora_adapter_metadata`` header.
* ``resolve`` maps the stems of a bundle onto the module paths of a model.
* ``atomic_path`` / ``atomic_write_bytes`` write files so that a crash never
  leaves a half-written file under the final name.

Pure torch + safetensors + stdlib: nothing here imports ComfyUI.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.lora import compile_pattern
from .fileio import atomic_path

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
KOHYA_UNET_PREFIX = "lora_unet_"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers: the peft LoraConfig(s) as JSON, per component prefix
MAX_SAVE_NAME_LEN = 150

_SafetensorError = getattr(safetensors, "SafetensorError", RuntimeError)

# (down suffix, up suffix); pairwise disjoint, so the first match is the only one.
_PAIR_SUFFIXES = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.default.weight", ".lora_B.default.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
)
_PEFT_PREFIX = "base_model.model."
_COMFY_PREFIX = "diffusion_model."
_TEXT_ENCODER_PREFIXES = (
    "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_",
    "text_encoder.", "text_encoder_2.", "text_encoder_3.", "text_encoders.",
    "te_", "te1_", "te2_", "te.", "te1.", "te2.",
)
_SAVE_NAME_RE = re.compile(r"^[A-Za-z0-9._ -]+$")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {
    f"{dev}{i}" for dev in ("COM", "LPT") for i in range(1, 10)}
_GOOD_NAME_EXAMPLE = "my_character_v1.safetensors"


class LoraFormatError(ValueError):
    """A LoRA file or LoRA data is unusable. The message names the offending
    value (path, key, shape) and says how to fix it."""


# --------------------------------------------------------------------------- #
# Data classes
# --------------------------------------------------------------------------- #

@dataclass
class LoraWeight:
    """One LoRA module: ``delta = scale * up @ down``.

    ``down`` is (r, in) for Linear or (r, in, kh, kw) for Conv2d (kohya
    ``lora_down``, peft ``lora_A``); ``up`` is (out, r) or (out, r, 1, 1)
    (kohya ``lora_up``, peft ``lora_B``). ``alpha=None`` means scale 1.0.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    def __post_init__(self) -> None:
        for name in ("down", "up"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise LoraFormatError(
                    f"LoRA {name} must be a torch.Tensor, got {type(value).__name__}: "
                    "pass the tensor itself")
            if value.ndim < 2:
                raise LoraFormatError(
                    f"LoRA {name} must have at least 2 dims, got shape {tuple(value.shape)}: "
                    "use (r, in[, kh, kw]) for down and (out, r[, 1, 1]) for up")
        down_shape, up_shape = tuple(self.down.shape), tuple(self.up.shape)
        if down_shape[0] != up_shape[1]:
            raise LoraFormatError(
                f"LoRA rank mismatch: down {down_shape} has rank {down_shape[0]} but "
                f"up {up_shape} has rank {up_shape[1]}: down must be (r, in...) and up (out, r...) "
                "with the same r")
        if down_shape[0] < 1:
            raise LoraFormatError(
                f"LoRA rank must be >= 1, got down {down_shape}: give the module at least rank 1")
        if any(d != 1 for d in up_shape[2:]):
            raise LoraFormatError(
                f"LoRA up {up_shape} has spatial dims other than 1: only (out, r, 1, 1) "
                "conv up-projections are supported")
        if self.alpha is not None:
            self.alpha = float(self.alpha)
            if not math.isfinite(self.alpha):
                raise LoraFormatError(
                    f"LoRA alpha must be finite, got {self.alpha}: use a number such as the rank")

    @property
    def rank(self) -> int:
        """The LoRA rank r (``down.shape[0]``)."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank``, or 1.0 when alpha is None (ComfyUI's rule)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """Natural shape of the delta: (out, in) or (out, in, kh, kw)."""
        return (int(self.up.shape[0]),) + tuple(int(d) for d in self.down.shape[1:])

    def delta(self, weight_shape=None) -> torch.Tensor:
        """Return ``scale * up @ down`` in float32.

        Both factors are flattened to 2-D for the matmul. The result has
        ``weight_shape`` when given (same number of elements required, else
        LoraFormatError), otherwise ``delta_shape``.
        """
        up2 = self.up.reshape(self.up.shape[0], self.rank).float()
        down2 = self.down.reshape(self.rank, -1).float()
        out = (up2 @ down2) * self.scale
        target = tuple(weight_shape) if weight_shape is not None else self.delta_shape
        if math.prod(target) != out.numel():
            raise LoraFormatError(
                f"LoRA delta {self.delta_shape} cannot be reshaped to weight shape {target}: "
                "the LoRA was made for a different model")
        return out.reshape(target)


@dataclass
class LoraBundle:
    """A set of LoRA modules plus file metadata.

    ``weights`` is keyed by module path (trainer output) or by the file's key
    stem (loaded files). ``text_encoder_keys`` counts text-encoder modules that
    were in the file but are not loaded. ``stems`` maps module paths to the key
    stems ``save_lora`` writes for the base model the bundle was made on (the
    model's ``lora_stems``); empty means the paths' own (SGM) stems.
    """

    weights: dict[str, LoraWeight]
    metadata: dict[str, str] = field(default_factory=dict)
    key_style: str = "module"
    text_encoder_keys: int = 0
    stems: dict[str, str] = field(default_factory=dict)

    @property
    def ranks(self) -> set[int]:
        """The distinct ranks of the modules."""
        return {w.rank for w in self.weights.values()}

    @property
    def num_params(self) -> int:
        """Total number of LoRA parameters (down + up elements)."""
        return sum(w.down.numel() + w.up.numel() for w in self.weights.values())


@dataclass
class MatchReport:
    """How well a bundle's modules matched a model (see ``resolve``)."""

    matched: int
    total: int
    missing: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    text_encoder_keys: int = 0
    duplicates: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every module matched (and there was at least one)."""
        return self.total > 0 and self.matched == self.total

    def summary(self) -> str:
        """One human-readable line, e.g. '12 of 16 LoRA modules match this model; ...'."""
        parts = [f"{self.matched} of {self.total} LoRA modules match this model"]
        if self.missing:
            parts.append(f"{len(self.missing)} not found (e.g. {', '.join(self.missing[:3])})")
        if self.shape_mismatch:
            key, delta, weight = self.shape_mismatch[0]
            parts.append(f"{len(self.shape_mismatch)} shape mismatch (e.g. {key}: "
                         f"LoRA delta {tuple(delta)} vs weight {tuple(weight)})")
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} duplicate target (e.g. {self.duplicates[0]})")
        if self.text_encoder_keys:
            parts.append(f"{self.text_encoder_keys} text-encoder modules ignored")
        return "; ".join(parts)


# --------------------------------------------------------------------------- #
# Saving
# --------------------------------------------------------------------------- #

def _normalize_module_path(path: str) -> str:
    """Drop a 'diffusion_model.' prefix and a '.weight' suffix."""
    if path.startswith(_COMFY_PREFIX):
        path = path[len(_COMFY_PREFIX):]
    if path.endswith(".weight"):
        path = path[: -len(".weight")]
    return path


def kohya_stem(module_path: str, prefix: str = KOHYA_UNET_PREFIX) -> str:
    """Kohya key stem of a module: 'a.b.1.c' -> 'lora_unet_a_b_1_c'.

    A leading 'diffusion_model.' and a trailing '.weight' are dropped first,
    so ComfyUI state-dict keys give the same stem as bare module paths.
    """
    return prefix + _normalize_module_path(module_path).replace(".", "_")


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(float(value))


def _default_metadata(weights: dict[str, LoraWeight]) -> dict[str, str]:
    ranks = {w.rank for w in weights.values()}
    alphas = {float(w.rank) if w.alpha is None else w.alpha for w in weights.values()}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(next(iter(ranks))) if len(ranks) == 1 else "mixed",
        "ss_network_alpha": _format_number(next(iter(alphas))) if len(alphas) == 1 else "mixed",
        "idlora_format_version": FORMAT_VERSION,
    }


def _encode_metadata(metadata: dict) -> dict[str, str]:
    """Make every key and value a str; non-str values are JSON-encoded."""
    out = {}
    for key, value in metadata.items():
        out[str(key)] = value if isinstance(value, str) else json.dumps(value, default=str)
    return out


def _cpu_tensor(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype).clone(
        memory_format=torch.contiguous_format)


def _stem_namer(stems: dict[str, str] | None):
    """key -> file stem: ``stems[path]``; a key that already is a kohya stem stays as it is, unless it is
    the SGM stem of a path in ``stems`` (then it gets that path's stem); any other key gets kohya_stem(key)."""
    stems = {_normalize_module_path(p): s for p, s in (stems or {}).items()}
    by_sgm_stem = {kohya_stem(p): s for p, s in stems.items()}

    def name(key: str) -> str:
        path = _normalize_module_path(key)
        if path in stems:
            return stems[path]
        if key.startswith(KOHYA_UNET_PREFIX):
            return by_sgm_stem.get(key, key)
        return kohya_stem(key)
    return name


def _kohya_tensors(weights: dict[str, LoraWeight], dtype, stems: dict[str, str] | None = None
                   ) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    owners: dict[str, str] = {}
    stem_of = _stem_namer(stems)
    for module_path, weight in weights.items():
        if not isinstance(weight, LoraWeight):
            raise LoraFormatError(
                f"weights[{module_path!r}] is a {type(weight).__name__}, not a LoraWeight: "
                "wrap the tensors as LoraWeight(down, up, alpha)")
        stem = stem_of(module_path)
        if stem in owners:
            raise LoraFormatError(
                f"module paths {owners[stem]!r} and {module_path!r} both map to kohya key "
                f"{stem!r}: rename one of the modules")
        owners[stem] = module_path
        alpha = float(weight.rank) if weight.alpha is None else weight.alpha
        tensors[f"{stem}.lora_down.weight"] = _cpu_tensor(weight.down, dtype)
        tensors[f"{stem}.lora_up.weight"] = _cpu_tensor(weight.up, dtype)
        tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors


def save_lora(path, weights: dict[str, LoraWeight], metadata: dict | None = None,
              dtype: torch.dtype | None = torch.float16, stems: dict[str, str] | None = None) -> str:
    """Write ``weights`` (module path -> LoraWeight) as a kohya LoRA file.

    Keys: '<stem>.lora_down.weight', '<stem>.lora_up.weight' and '<stem>.alpha'
    with stem = ``stems[module path]`` (pass a bundle's ``stems``: kohya's stems
    for its base model, e.g. diffusers-layout names on SD1.x/SD2.x), else
    kohya_stem(module path); a key that already is a 'lora_unet_' stem is kept
    (or renamed to ``stems``' stem of its module). Alpha is always written as a 0-d
    float32 tensor (rank when alpha is None, so the scale stays 1.0). Down/up
    are cast to ``dtype`` (None keeps their dtype). ``metadata`` is merged
    over the ss_* / idlora_* defaults; non-str values are JSON-encoded. The
    write is atomic. Returns the absolute path written.
    """
    if not weights:
        raise LoraFormatError(f"nothing to save to {path}: the weights dict is empty; "
                              "train at least one LoRA module before saving")
    if dtype is not None and not dtype.is_floating_point:
        raise LoraFormatError(f"save dtype must be a float dtype, got {dtype}: "
                              "use torch.float16, torch.bfloat16, torch.float32 or None")
    tensors = _kohya_tensors(weights, dtype, stems)
    meta = _encode_metadata({**_default_metadata(weights), **(metadata or {})})
    final = os.path.abspath(os.fspath(path))
    with atomic_path(final) as tmp:
        save_file(tensors, tmp, metadata=meta)
    logger.info("saved LoRA with %d modules to %s", len(weights), final)
    return final


def save_bundle(path, bundle: LoraBundle, dtype: torch.dtype | None = torch.float32, **metadata) -> str:
    """``save_lora`` of a trained bundle: its weights, its metadata (plus ``metadata``) and its base model's stems."""
    return save_lora(path, bundle.weights, {**bundle.metadata, **metadata}, dtype=dtype, stems=bundle.stems)


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #

def _split_key(key: str) -> tuple[str, str] | None:
    """Return (stem, 'down'|'up') for a LoRA factor key, else None."""
    for down_sfx, up_sfx in _PAIR_SUFFIXES:
        if key.endswith(down_sfx):
            return key[: -len(down_sfx)], "down"
        if key.endswith(up_sfx):
            return key[: -len(up_sfx)], "up"
    return None


def _is_text_encoder(stem: str) -> bool:
    return stem.startswith(_TEXT_ENCODER_PREFIXES)


def _clean_stem(stem: str) -> str:
    return stem[len(_PEFT_PREFIX):] if stem.startswith(_PEFT_PREFIX) else stem


def _detect_style(stems) -> str:
    def style(stem: str) -> str:
        if stem.startswith((KOHYA_UNET_PREFIX, "lora_te")):
            return "kohya"
        return "comfy" if stem.startswith(_COMFY_PREFIX) else "peft"
    counts = Counter(style(s) for s in stems)
    return counts.most_common(1)[0][0] if counts else "module"


def _unreadable(path: str, reason: str) -> LoraFormatError:
    hint = ""
    if os.path.splitext(path)[1].lower() in (".ckpt", ".pt", ".pth", ".bin"):
        hint = " Only .safetensors LoRA files are supported: convert it to .safetensors."
    return LoraFormatError(
        f"{path} is not a readable safetensors file ({reason}); it may be truncated or "
        f"still downloading: download or save it again.{hint}")


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise LoraFormatError(f"LoRA file not found: {path}. Check the file name, or put the "
                              "file in ComfyUI's models/loras folder and refresh the node.")
    if os.path.isdir(path):
        raise LoraFormatError(f"{path} is a directory, not a LoRA file: "
                              "pick a .safetensors file inside it.")
    size = os.path.getsize(path)
    if size < 8:
        raise _unreadable(path, f"file is only {size} bytes")


def _pair_keys(path: str, keys: list[str]) -> dict[str, tuple[str, str]]:
    """Map raw stem -> (down key, up key); raise on no pairs or orphans."""
    downs: dict[str, str] = {}
    ups: dict[str, str] = {}
    for key in keys:
        split = _split_key(key)
        if split is not None:
            (downs if split[1] == "down" else ups)[split[0]] = key
    if not downs and not ups:
        raise LoraFormatError(
            f"{path} holds no LoRA weights: none of its {len(keys)} keys end in "
            ".lora_down.weight / .lora_A.weight (or .lora_up.weight / .lora_B.weight); "
            f"first keys: {sorted(keys)[:5]}. It may be a checkpoint or an embedding: load "
            "checkpoints with Load Checkpoint (LoHa/LoKr files are not supported).")
    for have, lack, have_name, lack_name in ((downs, ups, "down", "up"), (ups, downs, "up", "down")):
        orphans = sorted(set(have) - set(lack))
        if orphans:
            raise LoraFormatError(
                f"{path}: LoRA module {orphans[0]!r} has a {have_name} weight but no {lack_name} "
                f"weight ({len(orphans)} such modules): the file is incomplete or damaged; "
                "download or export it again.")
    return {stem: (downs[stem], ups[stem]) for stem in sorted(downs)}


def _read_weight(handle, keys: set[str], path: str, stem: str, down_key: str,
                 up_key: str) -> LoraWeight:
    alpha = None
    if f"{stem}.alpha" in keys:
        alpha = float(handle.get_tensor(f"{stem}.alpha").float().reshape(-1)[0].item())
    down = handle.get_tensor(down_key).float()
    up = handle.get_tensor(up_key).float()
    try:
        return LoraWeight(down=down, up=up, alpha=alpha)
    except LoraFormatError as exc:
        raise LoraFormatError(
            f"{path}: LoRA module {stem!r}: {exc}. The file is damaged or was written by an "
            "incompatible tool: download or export it again.") from exc


def _log_unused(path: str, keys: list[str], pairs: dict[str, tuple[str, str]]) -> None:
    used = {k for pair in pairs.values() for k in pair} | {f"{s}.alpha" for s in pairs}
    unused = sorted(set(keys) - used)
    if unused:
        logger.warning("%s: ignored %d keys that are not LoRA down/up/alpha (e.g. %s)",
                       path, len(unused), unused[:3])


def _read_bundle(handle, path: str) -> LoraBundle:
    keys = list(handle.keys())
    key_set = set(keys)
    pairs = _pair_keys(path, keys)
    _log_unused(path, keys, pairs)
    weights: dict[str, LoraWeight] = {}
    te_count = 0
    for raw_stem, (down_key, up_key) in pairs.items():
        stem = _clean_stem(raw_stem)
        if _is_text_encoder(stem):
            te_count += 1
            continue
        if stem in weights:
            logger.warning("%s: LoRA module %r appears twice; keeping the first", path, stem)
            continue
        weights[stem] = _read_weight(handle, key_set, path, raw_stem, down_key, up_key)
    style = _detect_style(weights or [_clean_stem(s) for s in pairs])
    metadata = dict(handle.metadata() or {})
    _apply_adapter_metadata(path, weights, metadata)
    return LoraBundle(weights=weights, metadata=metadata, key_style=style,
                      text_encoder_keys=te_count)


def _adapter_configs(path: str, metadata: dict) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata`` header as {component prefix ('unet', ..., or '' when the
    config is not prefixed): peft LoraConfig fields}; {} when absent or unreadable."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        logger.warning("%s: ignored the unreadable %s header (%s)", path, ADAPTER_METADATA_KEY, exc)
        return {}
    configs: dict[str, dict] = {}
    for key, value in (data.items() if isinstance(data, dict) else ()):
        prefix, _, name = str(key).rpartition(".")  # "unet.lora_alpha" (pipeline files) or "lora_alpha"
        configs.setdefault(prefix, {})[name] = value
    return configs


def _pattern_value(patterns, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name. The keys
    come from the file, so they are matched with RE2 (linear time): a crafted pattern cannot stall the server."""
    for key, value in (patterns or {}).items():
        if compile_pattern(rf"^(.*\.)?({key})$", "a lora_adapter_metadata pattern").search(module):
            return value
    return default


def _metadata_alpha(stem: str, weight: LoraWeight, configs: dict[str, dict]) -> float | None:
    """The alpha (for scale = alpha / rank) that gives ``stem`` the scale peft gives it from its config."""
    prefix = next((p for p in sorted(configs, key=len, reverse=True) if p and stem.startswith(p + ".")), "")
    cfg = configs.get(prefix)
    if cfg is None:
        return None
    module = stem[len(prefix) + 1:] if prefix else stem
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha"))
    if alpha is None:
        return None
    r = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r")) or weight.rank
    scale = float(alpha) / (math.sqrt(float(r)) if cfg.get("use_rslora") else float(r))
    return scale * weight.rank


def _apply_adapter_metadata(path: str, weights: dict[str, LoraWeight], metadata: dict) -> None:
    """Give modules without an ``.alpha`` key the alpha of diffusers' adapter metadata, in place."""
    configs = _adapter_configs(path, metadata)
    if not configs:
        return
    try:
        for stem, weight in weights.items():
            if weight.alpha is None and (alpha := _metadata_alpha(stem, weight, configs)) is not None:
                weights[stem] = LoraWeight(weight.down, weight.up, alpha)
    except (TypeError, ValueError) as exc:  # LoraConfigError (a pattern RE2 refuses) is a ValueError
        raise LoraFormatError(f"{path}: its {ADAPTER_METADATA_KEY} header has an unusable alpha, rank or pattern "
                              f"({exc}): export the LoRA again") from exc


def load_lora(path) -> LoraBundle:
    """Load a kohya, ComfyUI-native or peft/diffusers LoRA ``.safetensors`` file.

    Tensors come back as float32, keyed by the file's key stem (a leading
    'base_model.model.' removed). A module without an '.alpha' key takes the
    scale that diffusers' ``lora_adapter_metadata`` header (peft ``lora_alpha``
    / ``r``, ``alpha_pattern``, ``rank_pattern``, ``use_rslora``; per component
    prefix such as 'unet.') gives it, stored as alpha = scale * rank.
    Text-encoder modules are counted in ``text_encoder_keys`` and not loaded.
    Raises LoraFormatError, naming the path and the fix, for a missing,
    unreadable or non-LoRA file, a down without its up (or vice versa) and a
    rank mismatch.
    """
    path = os.fspath(path)
    _check_file(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            bundle = _read_bundle(handle, path)
    except (_SafetensorError, OSError, RuntimeError) as exc:
        raise _unreadable(path, str(exc)) from exc
    logger.info("loaded LoRA %s: %d modules (%s keys), ranks %s, %d text-encoder modules skipped",
                path, len(bundle.weights), bundle.key_style, sorted(bundle.ranks),
                bundle.text_encoder_keys)
    return bundle


# --------------------------------------------------------------------------- #
# Resolving stems onto a model
# --------------------------------------------------------------------------- #

def _stem_variants(stem: str) -> list[str]:
    """The stem, without '.processor.', and with a trailing '.to_out' -> '.to_out.0'."""
    variants = [stem, stem.replace(".processor.", ".")]
    variants += [v + ".0" for v in variants if v.endswith(".to_out")]
    return list(dict.fromkeys(variants))


def _build_indexes(module_shapes: dict) -> tuple[dict[str, str], dict[str, str]]:
    """Return (normalized path -> key, kohya stem -> key) for the model's modules."""
    path_index: dict[str, str] = {}
    kohya_index: dict[str, str] = {}
    for key in module_shapes:
        path_index.setdefault(_normalize_module_path(key), key)
        stem = kohya_stem(key)
        if stem in kohya_index and kohya_index[stem] != key:
            logger.debug("kohya stem %s is ambiguous (%s, %s); keeping the first",
                         stem, kohya_index[stem], key)
        kohya_index.setdefault(stem, key)
    return path_index, kohya_index


def _lookup_path(path: str, module_shapes: dict, path_index: dict[str, str]) -> str | None:
    if path in module_shapes:
        return path
    found = path_index.get(_normalize_module_path(path))
    if found is None and path.startswith("unet."):
        found = path_index.get(_normalize_module_path(path[len("unet."):]))
    return found


def _match_stem(stem: str, module_shapes: dict, indexes, extra_key_map: dict) -> str | None:
    path_index, kohya_index = indexes
    for variant in _stem_variants(stem):
        found = _lookup_path(variant, module_shapes, path_index) or kohya_index.get(variant)
        if found is not None:
            return found
    for variant in _stem_variants(stem):
        mapped = extra_key_map.get(variant)
        if isinstance(mapped, str):
            found = _lookup_path(mapped, module_shapes, path_index)
            if found is not None:
                return found
    return None


def _shape_compatible(delta_shape: tuple, weight_shape: tuple) -> bool:
    return (len(weight_shape) > 0 and math.prod(delta_shape) == math.prod(weight_shape)
            and delta_shape[0] == weight_shape[0])


def resolve(bundle: LoraBundle, module_shapes: dict[str, tuple],
            extra_key_map: dict[str, str] | None = None
            ) -> tuple[dict[str, LoraWeight], MatchReport]:
    """Map each bundle stem to a module of the target model.

    ``module_shapes`` maps the model's dotted module path to its weight
    shape. A stem matches, in order: the module path itself, with a
    'diffusion_model.' or 'unet.' prefix dropped, the kohya stem of a module,
    then ``extra_key_map[stem]`` (values may carry 'diffusion_model.' and
    '.weight'; non-str values are ignored). Each rule is also tried with
    '.processor.' removed and a trailing '.to_out' read as '.to_out.0'.
    Returns ({module_shapes key: LoraWeight}, MatchReport); never raises on
    a bad match: modules whose delta does not fit the weight go to
    ``shape_mismatch``, unmatched stems to ``missing``.
    """
    indexes = _build_indexes(module_shapes)
    extra = extra_key_map or {}
    resolved: dict[str, LoraWeight] = {}
    report = MatchReport(matched=0, total=len(bundle.weights),
                         text_encoder_keys=bundle.text_encoder_keys)
    for stem, weight in bundle.weights.items():
        target = _match_stem(stem, module_shapes, indexes, extra)
        if target is None:
            report.missing.append(stem)
            continue
        weight_shape = tuple(int(d) for d in module_shapes[target])
        if not _shape_compatible(weight.delta_shape, weight_shape):
            report.shape_mismatch.append((stem, weight.delta_shape, weight_shape))
            continue
        if target in resolved:
            report.duplicates.append(stem)
            continue
        resolved[target] = weight
        report.matched += 1
    logger.debug("resolve: %s", report.summary())
    return resolved, report


# --------------------------------------------------------------------------- #
# File names
# --------------------------------------------------------------------------- #

def _bad_name(name, why: str) -> LoraFormatError:
    return LoraFormatError(f"invalid LoRA file name {name!r}: {why}. "
                           f"Use a plain file name such as {_GOOD_NAME_EXAMPLE!r}.")


def sanitize_save_name(name: str) -> str:
    """Return a plain file name ending in '.safetensors' for a user-typed name.

    Whitespace is stripped, spaces become '_', the extension is added when
    missing. Raises LoraFormatError for an empty name, path separators, '..',
    a leading or trailing '.', characters outside [A-Za-z0-9._ -], more than
    150 characters, or a reserved Windows device name.
    """
    if not isinstance(name, str):
        raise _bad_name(name, f"expected text, got {type(name).__name__}")
    stripped = name.strip()
    if not stripped:
        raise _bad_name(name, "the name is empty")
    if "/" in stripped or "\\" in stripped:
        raise _bad_name(name, "folders are not allowed, only a file name")
    if ".." in stripped:
        raise _bad_name(name, "'..' is not allowed")
    if stripped.startswith(".") or stripped.endswith("."):
        raise _bad_name(name, "the name must not start or end with '.'")
    if not _SAVE_NAME_RE.match(stripped):
        raise _bad_name(name, "only letters, digits, '.', '_', '-' and spaces are allowed")
    if len(stripped) > MAX_SAVE_NAME_LEN:
        raise _bad_name(name, f"it is {len(stripped)} characters, the limit is {MAX_SAVE_NAME_LEN}")
    if stripped.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
        raise _bad_name(name, "it is a reserved device name on Windows")
    result = stripped.replace(" ", "_")
    if not result.lower().endswith(".safetensors"):
        result += ".safetensors"
    return result
