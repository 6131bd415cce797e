"""The per-identity LoRA dataset of DiffLoRA (Sec. 3.5, "LoRA Weights Pipeline"): one LoRA per identity, all of
one architecture, plus the identity's face and CLIP image embeddings, to train the LoRA autoencoder / DiT on.

On-disk format (one output folder ``out/``)::

    out/<identity>/lora.safetensors        kohya LoRA (save_lora, float32); metadata idlora_method = "lora_dataset",
                                           idlora_identity, idlora_hash, idlora_trainer
    out/<identity>/embeddings.safetensors  "face" (k_f, Df) and "image" (k, Di) of the photos trained on, float32
    out/<identity>/entry.json              {"name", "hash", "trainer", "steps", "final_loss", "rank", "targets",
                                            "base_model", "images", "latents", "faces", "face_filter", ["augment"],
                                            "files": {"lora", "embeddings"}}

"images" counts the photos trained on, "latents" the training inputs (more with augmentation), "face_filter" what
the face filter did (select_faces: the images without a face, the reference, k, the kept and dropped files and
every similarity), "augment" the crops and flips (difflora_data.augmented_images).
    out/manifest.json                      every finished entry, sorted by name (rebuilt by write_manifest)

``entry.json`` is written last (atomically, like every file here): an identity is finished when its entry exists,
its hash matches and its files are there. The entries are per identity, not one shared manifest, so several
processes (shards, servers) can build into one folder without races; the manifest is only a summary, rebuilt from
the entries. An identity's hash (``identity_hash``) covers its image files, the settings and the base model, so
changed images or settings rebuild it and nothing else. Retraining a changed identity first removes its old
entry and files, and a cancel or crash in the middle leaves no lora.safetensors / entry.json for it.

Pure torch: the ComfyUI node encodes the images (VAE latents, conditioning, face and CLIP image embeddings) into
``IdentityItem``s; ``LoraDatasetTask`` (a background job, resumable mid-identity) and ``build`` (a plain call, for
command-line tools) share the per-identity code.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from .config import TrainingConfig
from .diffusion import Cond, DiffusionModel
from .fileio import atomic_path, atomic_write_bytes
from .jobs import load_job_data, save_job_data
from .lora_format import LoraBundle, load_lora, save_bundle
from .lora_trainer import LoraTrainConfig, LoraTrainer, TrainData, TrainingInputError
from .meta_lora import CropData, MetaLoraPersonalizer, MetaStage2Config, load_meta_down

log = logging.getLogger(__name__)

METHOD = "lora_dataset"
TRAINERS = ("lora", "meta_lora")
ENTRY, LORA, EMBEDDINGS, MANIFEST = "entry.json", "lora.safetensors", "embeddings.safetensors", "manifest.json"
ModelLoader = Callable[[dict], DiffusionModel]
DatasetStepCallback = Callable[[str, int, int, float], None]  # (identity, step of all, total of all, loss)


@dataclass
class DatasetConfig(TrainingConfig):
    """Settings shared by every identity: one architecture (targets + rank) for the whole population. With
    trainer "meta_lora" (Meta-LoRA stage 2 on a Meta-Down file) the targets are the Meta-Down's and rank is r2."""
    _label = "dataset settings"
    trainer: str = "lora"
    steps: int = 300
    learning_rate: float = 1e-4
    rank: int = 4
    targets: str = "attn"
    # ONE seed shared by all identities: every identity's LoRA starts from the same initialisation (and sees the
    # same noise / timestep sequence), so the population lives in one coordinate system for the autoencoder.
    seed: int = 0
    batch_size: int = 1
    resolution: int = 512
    class_word: str = "person"
    # which face / image embedders made the embeddings (recorded in every entry and in the DiffLoRA file, so that
    # sampling can check it uses the same ones; part of the hash: other embedders give other embeddings)
    embedders: dict = field(default_factory=dict)
    # the face filter (the paper keeps the top 85 of 100 images by InsightFace similarity): on when face_keep > 0
    # or face_keep_fraction < 1. It drops the images without a face, then keeps the k most similar to the
    # identity's reference face embedding, k = min(face_keep or all, ceil(face_keep_fraction x images), faces).
    face_keep: int = 0
    face_keep_fraction: float = 1.0
    face_reference: str = "mean"     # "mean": the mean of the identity's unit face embeddings; else an image's name
    # crop / flip augmentation (the paper: "cropping and flipping"; off by default): each kept image gives one
    # square crop per scale (side = scale x the image's shorter side, centred), each flipped with augment_flip
    augment: bool = False
    augment_scales: tuple[float, ...] = (1.0, 0.9, 0.8)
    augment_flip: float = 0.5

    def train_config(self) -> LoraTrainConfig:
        common = dict(steps=self.steps, learning_rate=self.learning_rate, rank=self.rank, targets=self.targets,
                      seed=self.seed, batch_size=self.batch_size)
        return MetaStage2Config(**common) if self.trainer == "meta_lora" else LoraTrainConfig(**common)

    def validate(self) -> "DatasetConfig":
        need = self.need
        need(self.trainer in TRAINERS, "trainer", f"use one of {TRAINERS}")
        need(isinstance(self.resolution, int) and self.resolution >= 8 and self.resolution % 8 == 0, "resolution",
             "use a whole number of pixels that is a multiple of 8, e.g. 512")
        need(isinstance(self.class_word, str), "class_word", "use a word such as 'person', 'man' or 'woman'")
        need(isinstance(self.seed, int), "seed", "use a whole number")
        need(self.trainer != "meta_lora" or self.batch_size == 1, "batch_size",
             "use 1 with trainer 'meta_lora' (its crops have different sizes)")
        need(isinstance(self.face_keep, int) and not isinstance(self.face_keep, bool) and self.face_keep >= 0,
             "face_keep", "use a whole number of images >= 0 (0: no limit; the paper: 85 of 100)")
        need(isinstance(self.face_keep_fraction, (int, float)) and 0 < self.face_keep_fraction <= 1,
             "face_keep_fraction", "use a fraction 0 < f <= 1 of each identity's images (1: no limit; the paper: "
                                   "0.85)")
        need(isinstance(self.face_reference, str) and self.face_reference.strip() != "", "face_reference",
             "use 'mean' (the mean face embedding of the identity) or the file name of a reference image")
        need(self.face_reference == "mean" or self.filters_faces, "face_reference",
             "a reference image only matters with the face filter: set face_keep > 0 or face_keep_fraction < 1, "
             "or use 'mean'")
        need(isinstance(self.augment, bool), "augment", "use true or false")
        need(isinstance(self.augment_scales, (tuple, list)) and len(self.augment_scales) > 0 and all(
            isinstance(v, (int, float)) and 0 < v <= 1 for v in self.augment_scales), "augment_scales",
             "use one or more crop sides as fractions 0 < s <= 1 of the image's shorter side, e.g. (1.0, 0.9, 0.8)")
        need(isinstance(self.augment_flip, (int, float)) and 0 <= self.augment_flip <= 1, "augment_flip",
             "use a probability from 0 (never flip) to 1 (always flip), e.g. 0.5")
        self.train_config().validate()
        return self

    @property
    def filters_faces(self) -> bool:
        return self.face_keep > 0 or self.face_keep_fraction < 1

    def hashed_settings(self) -> dict:
        """The settings an identity's hash covers: all of them, less the face filter's while it is off and the
        augmentation's while it is off (so datasets built before these settings existed keep their hashes, and
        turning either on, or changing k, rebuilds)."""
        d = asdict(self)
        if not self.filters_faces:
            for k in ("face_keep", "face_keep_fraction", "face_reference"):
                d.pop(k)
        if not self.augment:
            for k in ("augment", "augment_scales", "augment_flip"):
                d.pop(k)
        return d


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def identity_hash(files: list[Path], config: DatasetConfig, base_model: str, extra: str = "") -> str:
    """sha256 over the sorted file names and their bytes, the settings, the base model and ``extra`` (e.g. the
    Meta-Down file's ``file_sha256``): changed images or settings give another hash."""
    if not files:
        raise TrainingInputError("files is empty: an identity needs at least one image file")
    h = hashlib.sha256(b"idlora-lora-dataset-v1\0")
    for p in sorted((Path(f) for f in files), key=lambda p: (p.name, str(p))):
        h.update(f"{p.name}\0{file_sha256(p)}\0".encode())
    h.update(json.dumps(config.hashed_settings(), sort_keys=True).encode() + b"\0")
    h.update(f"{base_model}\0{extra}".encode())
    return h.hexdigest()


@dataclass
class IdentityItem:
    """One identity, encoded: latents (k, C, h, w), conditioning (k rows), face embeddings (k_f, Df) of the
    images in which a face was found, CLIP image embeddings (k_i, Di), one per photo: k_i = k, or fewer with
    augmentation (several crops of each photo)."""
    name: str
    hash: str
    latents: torch.Tensor
    cond: Cond
    face: torch.Tensor
    image: torch.Tensor
    record: dict = field(default_factory=dict)  # the face filter's and augmentation's choices, for entry.json

    def validate(self) -> "IdentityItem":
        n = self.name
        if not isinstance(n, str) or not n.strip() or n != n.strip() or any(c in n for c in "/\\\0") \
                or n.startswith(".") or n == MANIFEST:
            raise TrainingInputError(f"identity name {n!r} cannot be a folder name: use a plain name without '/', "
                                     f"'\\', a leading '.' or surrounding spaces (e.g. 'alice')")
        if self.latents.ndim != 4 or self.latents.shape[0] < 1:
            raise TrainingInputError(f"identity {n!r}: latents has shape {tuple(self.latents.shape)}, expected "
                                     f"(k, C, h, w) with k >= 1: give it at least one image")
        k = self.latents.shape[0]
        bad = {key: tuple(v.shape) for key, v in self.cond.items() if v.shape[0] != k}
        for what, t, rows in (("face", self.face, None), ("image", self.image, range(1, k + 1))):
            if t.ndim != 2 or (rows is not None and t.shape[0] not in rows):
                bad[what] = tuple(t.shape)
        if bad or not self.cond:
            raise TrainingInputError(f"identity {n!r} has {k} latents but shapes {bad or 'no cond'}: cond needs {k} "
                                     f"rows per tensor, face (k_f, Df) and image (k_i, Di) with 1 <= k_i <= {k} "
                                     f"(one per photo)")
        if self.face.shape[0] == 0:
            log.warning("identity %r: no face was found in any of its %d images; its face embedding is empty", n, k)
        return self

    def to_dict(self) -> dict:
        return {"name": self.name, "hash": self.hash, "latents": self.latents.detach().cpu(),
                "cond": {k: v.detach().cpu() for k, v in self.cond.items()},
                "face": self.face.detach().float().cpu(), "image": self.image.detach().float().cpu(),
                "record": json.dumps(self.record)}

    @classmethod
    def from_dict(cls, d: dict) -> "IdentityItem":
        return cls(d["name"], d["hash"], d["latents"], d["cond"], d["face"], d["image"],
                   json.loads(d.get("record", "{}")))


@dataclass
class FaceSelection:
    """What the face filter keeps of one identity's images: ``kept`` (indices into its images, in their order),
    ``face_rows`` (the rows of its face embeddings that belong to kept images) and ``record`` (for entry.json)."""
    kept: list[int]
    face_rows: list[int]
    record: dict


def select_faces(identity: str, names: list[str], face: torch.Tensor, found: list[int],
                 cfg: DatasetConfig) -> FaceSelection:
    """The face filter of one identity (DatasetConfig.face_keep / face_keep_fraction / face_reference).

    ``names``: its image file names; ``face`` (k_f, D): the face embeddings of the images ``found`` (indices into
    ``names``, ascending). With the filter off every image is kept. With it on, the images without a face are dropped
    (and counted), each other image is scored by the cosine similarity of its face embedding to the reference (the
    normalised mean of the identity's unit face embeddings, or the embedding of the image named ``face_reference``,
    which competes too, at similarity 1), and the k best are kept (ties: the earlier image), k = min(face_keep or
    all, ceil(face_keep_fraction x all images), images with a face)."""
    n, has_face = len(names), set(found)
    no_face = [names[i] for i in range(n) if i not in has_face]
    if not cfg.filters_faces:
        return FaceSelection(list(range(n)), list(range(len(found))),
                             {"face_filter": {"on": False, "images": n, "no_face": len(no_face)}})
    if not found:
        raise TrainingInputError(f"identity {identity!r}: no face was found in any of its {n} images, so the face "
                                 f"filter has nothing to keep: remove the folder or add photos with a clear face")
    unit = torch.nn.functional.normalize(face.float(), dim=1)
    ref = cfg.face_reference
    if ref == "mean":
        reference = torch.nn.functional.normalize(unit.mean(0), dim=0)
    else:
        hits = [i for i in range(n) if names[i] == ref or Path(names[i]).stem == ref]
        if len(hits) != 1:
            raise TrainingInputError(
                f"identity {identity!r}: face_reference = {ref!r} matches {len(hits)} of its images "
                f"({[names[i] for i in hits] or names[:5]}): put exactly one image of that name (or stem) in every "
                f"identity's folder, or use face_reference 'mean'")
        if hits[0] not in has_face:
            raise TrainingInputError(f"identity {identity!r}: its reference image {names[hits[0]]!r} shows no face: "
                                     f"replace it with a photo where the face is clearly visible, or use "
                                     f"face_reference 'mean'")
        reference = unit[found.index(hits[0])]
    sim = (unit @ reference).tolist()
    k = min(len(found), cfg.face_keep or len(found), max(1, math.ceil(cfg.face_keep_fraction * n - 1e-9)))
    rows = sorted(sorted(range(len(found)), key=lambda j: (-sim[j], j))[:k])
    kept, rest = [found[j] for j in rows], sorted(set(range(len(found))) - set(rows))
    record = {"on": True, "reference": ref, "face_keep": cfg.face_keep, "face_keep_fraction": cfg.face_keep_fraction,
              "images": n, "no_face": len(no_face), "no_face_files": no_face, "keep": k,
              "kept": [names[i] for i in kept], "dropped": [names[found[j]] for j in rest],
              "similarity": {names[i]: round(sim[j], 6) for j, i in enumerate(found)}}
    return FaceSelection(kept, rows, {"face_filter": record})


def check_items(items: list[IdentityItem]) -> list[IdentityItem]:
    if not items:
        raise TrainingInputError("no identities to build: give at least one identity (one folder of images each)")
    names = [it.validate().name for it in items]
    dupes = sorted({x for x in names if names.count(x) > 1})
    if dupes:
        raise TrainingInputError(f"identities {dupes} appear more than once: every identity needs a name of its own")
    for what in ("face", "image"):
        dims = {it.name: int(getattr(it, what).shape[1]) for it in items}
        if len(set(dims.values())) > 1:
            raise TrainingInputError(f"the {what} embeddings have different sizes {dims}: encode every identity "
                                     f"with the same {what} embedder")
    return list(items)


def shard(items: list, index: int, count: int) -> list:
    """The items at positions i % count == index of the name-sorted list (items: IdentityItem, (name, hash) or
    names). Shards of one list are disjoint and together give every item."""
    if not isinstance(count, int) or count < 1:
        raise TrainingInputError(f"shard count = {count!r} is invalid: use a whole number >= 1 (1: no sharding)")
    if not isinstance(index, int) or not 0 <= index < count:
        raise TrainingInputError(f"shard index = {index!r} is invalid for {count} shards: use 0 <= index < {count} "
                                 f"(the shards are numbered from 0)")
    return [it for i, it in enumerate(sorted(items, key=_name)) if i % count == index]


def _name(item) -> str:
    return item if isinstance(item, str) else item.name if isinstance(item, IdentityItem) else item[0]


# -- the folder ---------------------------------------------------------------------------------------------------

def read_entry(out: str | Path, name: str) -> dict | None:
    """The identity's entry.json, or None when it is missing or unreadable."""
    path = Path(out) / name / ENTRY
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("ignoring the unreadable %s (%s): the identity will be built again", path, e)
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("files"), dict) else None


def _complete(out: Path, entry: dict | None, name: str) -> bool:
    return entry is not None and entry.get("name") == name and all(
        (out / name / str(f)).is_file() for f in entry["files"].values())


def finished(out: str | Path, name: str, hash: str) -> bool:
    """True when the identity is built with this hash (entry present, hash equal, files there)."""
    entry = read_entry(out, name)
    return _complete(Path(out), entry, name) and entry.get("hash") == hash


def finished_entries(out: str | Path) -> list[dict]:
    """The entries of every finished identity of the folder, sorted by name."""
    out = Path(out)
    if not out.is_dir():
        return []
    names = sorted(d.name for d in out.iterdir() if d.is_dir() and not d.name.startswith("."))
    entries = {n: read_entry(out, n) for n in names}
    return [e for n, e in entries.items() if _complete(out, e, n)]


def write_manifest(out: str | Path) -> dict:
    """Rebuild out/manifest.json from the finished entries (atomically) and return it."""
    manifest = {"format": METHOD, "version": 1, "identities": finished_entries(out)}
    atomic_write_bytes(Path(out) / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


@dataclass
class Plan:
    """``done``: built with this hash; ``todo``: to build (new or changed); ``changed``: the part of ``todo``
    that has an entry of another hash (or with files missing), which a build replaces."""
    done: list[str] = field(default_factory=list)
    todo: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)


def plan(out: str | Path, items: Iterable) -> Plan:
    """What a build of ``items`` (IdentityItem or (name, hash)) into ``out`` would do."""
    result = Plan()
    for it in items:
        name, h = (it.name, it.hash) if isinstance(it, IdentityItem) else tuple(it)
        if finished(out, name, h):
            result.done.append(name)
            continue
        result.todo.append(name)
        if read_entry(out, name) is not None:
            result.changed.append(name)
    return result


def clear_identity(out: Path, name: str) -> None:
    """Remove an identity's files, its entry first (so that it is never listed with files of another build)."""
    for f in (ENTRY, LORA, EMBEDDINGS):
        (out / name / f).unlink(missing_ok=True)


def write_identity(out: Path, item: IdentityItem, trainer: LoraTrainer, cfg: DatasetConfig) -> dict:
    """Write the trained identity: LoRA, embeddings, and its entry last."""
    from safetensors.torch import save_file
    folder = out / item.name
    bundle = trainer.bundle()
    tags = {"idlora_identity": item.name, "idlora_hash": item.hash}
    save_bundle(folder / LORA, bundle, idlora_method=METHOD, idlora_trainer=cfg.trainer, **tags)
    with atomic_path(folder / EMBEDDINGS) as tmp:
        save_file({"face": item.face.detach().float().cpu().contiguous(),
                   "image": item.image.detach().float().cpu().contiguous()}, tmp, metadata=tags)
    entry = {"name": item.name, "hash": item.hash, "trainer": cfg.trainer, "steps": trainer.step,
             "final_loss": trainer.losses[-1] if trainer.losses else None, "rank": cfg.rank,
             "targets": bundle.metadata.get("idlora_targets", cfg.targets), "base_model": trainer.model.name,
             "images": int(item.image.shape[0]), "latents": int(item.latents.shape[0]),
             "faces": int(item.face.shape[0]), "embedders": cfg.embedders,
             **item.record, "files": {"lora": LORA, "embeddings": EMBEDDINGS}}
    atomic_write_bytes(folder / ENTRY, json.dumps(entry, indent=1).encode())
    return entry


# -- training -------------------------------------------------------------------------------------------------

def make_trainer(model: DiffusionModel, item: IdentityItem, cfg: DatasetConfig, meta_down=None) -> LoraTrainer:
    """A LoraTrainer on the identity's images, or (trainer "meta_lora") a MetaLoraPersonalizer with one crop per
    image; ``meta_down`` is ``load_meta_down``'s (weights, metadata)."""
    dev = model.device
    latents = item.latents.to(dev, torch.float32)
    cond = {k: v.to(dev) for k, v in item.cond.items()}
    k = latents.shape[0]
    if cfg.trainer == "meta_lora":
        data = CropData([latents[i:i + 1] for i in range(k)], [{c: v[i:i + 1] for c, v in cond.items()}
                                                               for i in range(k)])
        return MetaLoraPersonalizer(model, data, cfg.train_config(), *meta_down)
    return LoraTrainer(model, TrainData(latents, cond, [""] * k), cfg.train_config())


def check_meta_down_path(cfg: DatasetConfig, meta_down_path) -> None:
    if cfg.trainer == "meta_lora" and not meta_down_path:
        raise TrainingInputError("meta_down_path is empty but trainer = 'meta_lora': choose a Meta-Down file (train "
                                 "one with IDLoRA Meta-LoRA Stage 1), or use trainer 'lora'")
    if cfg.trainer != "meta_lora" and meta_down_path:
        raise TrainingInputError(f"meta_down_path = {str(meta_down_path)!r} is set but trainer = {cfg.trainer!r}: "
                                 f"use trainer 'meta_lora' to train on the Meta-Down, or leave the path empty")


TrainFn = Callable[[LoraTrainer, int, IdentityItem], None]  # trains one identity (its position, the item)


def _build_all(model: DiffusionModel, items: list[IdentityItem], out: str | Path, cfg: DatasetConfig,
               meta_down_path, train: TrainFn, logger: logging.Logger,
               on_skip: Callable[[int, IdentityItem], None] | None = None) -> dict:
    """The per-identity loop shared by the job and ``build``: skip the finished, train and write the rest."""
    cfg.validate()
    items = check_items(items)
    check_meta_down_path(cfg, meta_down_path)
    meta_down = load_meta_down(meta_down_path) if cfg.trainer == "meta_lora" else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trained, skipped = [], []
    for i, item in enumerate(items):
        if finished(out, item.name, item.hash):
            logger.info("identity %s is already built (hash %s…): skipped", item.name, item.hash[:12])
            skipped.append(item.name)
            if on_skip:
                on_skip(i, item)
            continue
        clear_identity(out, item.name)  # a changed identity: its old LoRA no longer matches its images
        trainer = make_trainer(model, item, cfg, meta_down)
        train(trainer, i, item)
        entry = write_identity(out, item, trainer, cfg)
        logger.info("identity %s built (%d of %d, final loss %s)", item.name, i + 1, len(items), entry["final_loss"])
        trained.append(item.name)
        del trainer
    write_manifest(out)
    return {"dataset": str(out), "identities": len(items), "trained": trained, "skipped": skipped}


def build(model: DiffusionModel, items: list[IdentityItem], out: str | Path, cfg: DatasetConfig,
          on_step: DatasetStepCallback | None = None, meta_down_path: str | Path | None = None) -> dict:
    """Build the dataset without a job (command-line tools). ``on_step(identity, step, total, loss)`` numbers the
    steps across all identities to train (finished ones count as done) and may raise to stop."""
    n, steps = len(items), cfg.steps

    def train(trainer: LoraTrainer, i: int, item: IdentityItem) -> None:
        trainer.run(None if on_step is None else lambda s, _t, loss: on_step(item.name, i * steps + s, n * steps,
                                                                             loss))
    return _build_all(model, items, out, cfg, meta_down_path, train, log)


class LoraDatasetTask:
    """The dataset build as a background job: one phase per identity, resumable in the middle of an identity."""
    kind = METHOD

    def __init__(self, cfg: DatasetConfig, out_dir: str | Path, items: list[IdentityItem], model_source: dict,
                 model_loader: ModelLoader, meta_down_path: str | Path | None = None):
        self.cfg, self.items, self.model_loader = cfg.validate(), check_items(items), model_loader
        check_meta_down_path(cfg, meta_down_path)
        self.phases = [it.name for it in self.items]
        self.config = {"dataset": asdict(cfg), "out_dir": str(out_dir), "model_source": model_source,
                       "meta_down_path": str(meta_down_path) if meta_down_path else None, "identities": self.phases}

    @classmethod
    def from_config(cls, config: dict, job_dir: Path, model_loader: ModelLoader) -> "LoraDatasetTask":
        d = load_job_data(job_dir, "the encoded identities")
        return cls(DatasetConfig.from_dict(config["dataset"]), config["out_dir"],
                   [IdentityItem.from_dict(x) for x in d["items"]], config["model_source"], model_loader,
                   config.get("meta_down_path"))

    def prepare(self, job_dir: Path) -> None:
        save_job_data(job_dir, {"items": [it.to_dict() for it in self.items]})

    def run(self, ctx) -> dict:
        model = self.model_loader(self.config["model_source"])
        n, steps = len(self.items), self.cfg.steps

        def train(trainer: LoraTrainer, i: int, item: IdentityItem) -> None:
            # phase = the identity: a checkpoint of another identity is ignored, this one's is resumed
            trainer.run_in_job(ctx, phase=item.name, step_offset=i * steps, total=n * steps)

        def skip(i: int, item: IdentityItem) -> None:
            ctx.progress((i + 1) * steps, n * steps, None, item.name)
        return _build_all(model, self.items, self.config["out_dir"], self.cfg, self.config["meta_down_path"], train,
                          ctx.log, skip)


# -- reading the dataset --------------------------------------------------------------------------------------

@dataclass
class LoraPopulation:
    """The finished identities of a dataset folder, sorted by name; all LoRAs of one layout."""
    names: list[str]
    bundles: dict[str, LoraBundle]
    face: list[torch.Tensor]
    image: list[torch.Tensor]
    entries: list[dict]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def layout(self) -> dict[str, tuple]:
        return lora_layout(self.bundles[self.names[0]])


def lora_layout(bundle: LoraBundle) -> dict[str, tuple]:
    """{layer: (down shape, up shape, alpha)}."""
    return {k: (tuple(w.down.shape), tuple(w.up.shape), w.alpha if w.alpha is not None else float(w.rank))
            for k, w in bundle.weights.items()}


def _layout_diff(layout: dict, ref: dict, ref_name: str) -> str:
    missing, extra = sorted(set(ref) - set(layout)), sorted(set(layout) - set(ref))
    if missing or extra:
        return (f"other layers than {ref_name!r}: {len(missing)} missing (e.g. {missing[:1]}), {len(extra)} extra "
                f"(e.g. {extra[:1]})")
    for k in sorted(ref):
        (d, u, a), (rd, ru, ra) = layout[k], ref[k]
        if d[0] != rd[0]:
            return f"rank {d[0]} at layer {k}, where {ref_name!r} has rank {rd[0]}"
        if (d, u) != (rd, ru):
            return f"shapes down {d} / up {u} at layer {k}, where {ref_name!r} has {rd} / {ru}"
        if not math.isclose(a, ra):
            return f"alpha {a:g} at layer {k}, where {ref_name!r} has alpha {ra:g}"
    return ""


def load_population(out: str | Path) -> LoraPopulation:
    """Every finished identity of the folder; ValueError naming the identity when one does not fit the others."""
    from safetensors.torch import load_file
    out = Path(out)
    entries = finished_entries(out)
    if not entries:
        raise ValueError(f"the LoRA dataset folder {out} has no finished identities (no <identity>/{ENTRY}): build "
                         f"them first with the IDLoRA LoRA dataset builder (training.lora_dataset.build or its node)")
    names = [e["name"] for e in entries]
    bundles, face, image = {}, [], []
    for e in entries:
        folder = out / e["name"]
        bundles[e["name"]] = bundle = load_lora(folder / e["files"]["lora"])
        if bundle.metadata.get("idlora_hash") != e["hash"]:
            raise ValueError(f"identity {e['name']!r}: its {LORA} belongs to another build than its {ENTRY}: remove "
                             f"the folder {folder} and build the identity again")
        emb = load_file(str(folder / e["files"]["embeddings"]))
        face.append(emb["face"])
        image.append(emb["image"])
    _check_population(out, entries, bundles, face, image)
    return LoraPopulation(names, bundles, face, image, entries)


def _check_population(out: Path, entries: list[dict], bundles: dict, face: list, image: list) -> None:
    names = [e["name"] for e in entries]
    layouts = {n: lora_layout(b) for n, b in bundles.items()}
    keys = {n: tuple(sorted(lay.items())) for n, lay in layouts.items()}
    ref_name = next(n for n in names if keys[n] == Counter(keys.values()).most_common(1)[0][0])  # the majority's
    ref = names.index(ref_name)
    for i, e in enumerate(entries):
        n = e["name"]
        problem = _layout_diff(layouts[n], layouts[ref_name], ref_name)
        if not problem and e.get("base_model") != entries[ref].get("base_model"):
            problem = f"base model {e.get('base_model')!r}, where {ref_name!r} has {entries[ref].get('base_model')!r}"
        for what, t in (("face", face), ("image", image)):
            if not problem and t[i].shape[1] != t[ref].shape[1]:
                problem = f"{what} embeddings of size {t[i].shape[1]}, where {ref_name!r} has {t[ref].shape[1]}"
        if problem:
            raise ValueError(f"the LoRA dataset {out} mixes layouts: identity {n!r} has {problem}. Every identity "
                             f"needs the same targets, rank and embedders (one DatasetConfig): rebuild {n!r} with "
                             f"the dataset's settings or remove its folder")
