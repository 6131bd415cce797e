"""Meta-LoRA's evaluation loop as the paper runs it (Sec. 4.2-4.3, App. B.1, G; Algorithm 3).

For every identity folder (one subfolder of photos per person): one photo is the training photo (the reference), the
others are the test set T. Each method (``STAGE2_METHODS``: Meta-LoRA stage 2 on a given Meta-Down, and the baseline
"LoRA + augmented inputs") fine-tunes on the training photo's face-centred crops ONCE, and a snapshot of the LoRA is
kept at every evaluated step count (the paper: 250, 375, 500, 625, 750), so one run gives every row. Each snapshot
generates one image per (prompt, seed); every generated face is compared with the faces of T (the training photo is
left out: R-FaceSim), and each image with its prompt (CLIP-T, when a CLIP model is given). The result is the paper's
table: one row per (method, steps), columns R-FaceSim and CLIP-T (plus FaceSim against the training photo, which
the paper's Table 3 sets beside R-FaceSim, and the counts).

Pure torch: the model comes from ``load_model`` (a ``DiffusionModel``; in ComfyUI ``nodes.comfy_adapter.
ComfyDiffusion``), images from ``generate`` (in ComfyUI ``nodes.comfy_sampling.ComfyGenerator``: ComfyUI's own
sampler), faces from a ``FaceEmbedder``, CLIP features from two functions (``models.face_embed.OpenClipScorer``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..models.face_detect import FaceDetector
from ..models.face_embed import EmbedResult, FaceEmbedder, read_rgb
from .config import TrainingConfig, TrainingInputError
from .diffusion import DiffusionModel
from .evaluate import csv_text, write_json
from .fileio import atomic_write_bytes
from .lora_format import LoraBundle
from .lora_trainer import LoraTrainer
from .meta_augment import AugmentConfig, FaceNotFoundError, augment, largest_face_box
from .meta_lora import STAGE2_METHODS, MetaStage2Config, stage2_trainer
from .meta_lora_data import encode_crops, scan_identity_folder
from .metrics import clip_t, cosine_matrix, metric_result, r_facesim

log = logging.getLogger(__name__)

PAPER_STEPS = (250, 375, 500, 625, 750)  # App. B.1: the checkpoints both methods are evaluated at
# after the paper's R-FaceSim prompts (Table 7: frontal, unoccluded faces); "{}" is the subject
DEFAULT_PROMPTS = (
    "a {} standing in a sunlit urban plaza, facing directly toward the camera, highly detailed face, direct eye "
    "contact",
    "a {} in a casual outfit in a blooming garden with soft natural light, face clearly visible, eyes meeting the "
    "camera",
    "a {} in a minimalist modern outfit against a softly lit abstract background, face rendered in intricate detail",
    "a {} in elegant attire against a scenic landscape at sunrise, face captured in sharp detail, steady direct gaze",
)
METRICS = ("R-FaceSim", "CLIP-T", "FaceSim")
TABLE_HEADER = ("method", "steps", "R-FaceSim", "CLIP-T", "FaceSim", "images", "no_face")
NO_CLIP = "not computed: no CLIP model given"

# (LoRA snapshot or None for the base model, prompts, seeds) -> (N, H, W, 3) images in [0, 1]
Generate = Callable[[Optional[LoraBundle], list[str], list[int]], torch.Tensor]
Features = Callable[[Any], torch.Tensor]


@dataclass
class MetaEvalConfig(TrainingConfig):
    """The loop's settings. Training: stage 2's (App. B.1: lr 4e-4, rank 1, batch 1, AdamW) for both methods.
    Generation: the paper's Meta-LoRA / LoRA inference (30 steps, guidance 3.5 on Flux-dev; on a model without a
    guidance embedding ``cfg`` is the classifier-free guidance scale)."""
    methods: tuple[str, ...] = STAGE2_METHODS
    steps: tuple[int, ...] = PAPER_STEPS     # step counts evaluated (snapshots of one run; 0: the base model)
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    token: str = "sks"                       # "{}" in a prompt: "<token> <class_word>" to generate and train,
    class_word: str = "person"               # "<class_word>" alone for CLIP-T
    train_prompt: str = "a photo of {}"
    images_per_prompt: int = 1               # seeds seed, seed + 1, ... (the same for every method and step)
    reference: str = ""                      # the training photo's file name or stem in every folder; "": the first
    rank: int = 1                            # r2 of Meta-LoRA, the rank of the baseline LoRA
    learning_rate: float = 4e-4
    max_images: int = 25                     # augmented crops (App. D: up to 25)
    resolution: int = 512                    # each crop is resized to about resolution^2 pixels
    seed: int = 0
    width: int = 512
    height: int = 512
    sample_steps: int = 30
    cfg: float = 3.5
    sampler: str = "euler"
    scheduler: str = "normal"

    def validate(self) -> "MetaEvalConfig":
        need = self.need
        need(len(self.methods) > 0 and len(set(self.methods)) == len(self.methods)
             and all(m in STAGE2_METHODS for m in self.methods), "methods",
             f"use one or both of {STAGE2_METHODS}, each once")
        need(len(self.steps) > 0 and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                         for s in self.steps) and len(set(self.steps)) == len(self.steps), "steps",
             "use distinct whole numbers >= 0, e.g. 250, 375, 500, 625, 750 (the paper's)")
        need(len(self.prompts) > 0 and all(isinstance(p, str) and p.strip() for p in self.prompts), "prompts",
             "give at least one non-empty prompt; '{}' in it stands for the subject ('sks person')")
        need(isinstance(self.images_per_prompt, int) and self.images_per_prompt >= 1, "images_per_prompt",
             "use a whole number >= 1")
        need(isinstance(self.rank, int) and self.rank >= 1, "rank", "use a whole number >= 1 (the paper: 1)")
        need(math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning_rate", "use e.g. 4e-4")
        need(isinstance(self.max_images, int) and 1 <= self.max_images <= 25, "max_images", "use 1 to 25")
        need(isinstance(self.resolution, int) and self.resolution >= 64 and self.resolution % 64 == 0, "resolution",
             "use a multiple of 64 >= 64, e.g. 512")
        for side in ("width", "height"):
            v = getattr(self, side)
            need(isinstance(v, int) and v >= 16 and v % 16 == 0, side, "use a multiple of 16 >= 16, e.g. 512")
        need(isinstance(self.sample_steps, int) and self.sample_steps >= 1, "sample_steps", "use e.g. 30")
        need(math.isfinite(self.cfg) and self.cfg >= 0, "cfg", "use a number >= 0, e.g. 3.5")
        self.steps = tuple(sorted(self.steps))
        return self

    def subject(self, clip: bool = False) -> str:
        return self.class_word if clip else f"{self.token} {self.class_word}".strip()

    def prompt_pairs(self) -> list[tuple[str, str, int]]:
        """(generation prompt, CLIP-T prompt, seed) of every image of one snapshot, prompt-major."""
        return [(fill(p, self.subject()), fill(p, self.subject(clip=True)), self.seed + k)
                for p in self.prompts for k in range(self.images_per_prompt)]


def fill(prompt: str, subject: str) -> str:
    return prompt.replace("{}", subject) if "{}" in prompt else prompt


def parse_steps(text: str) -> tuple[int, ...]:
    """'250, 375 500' -> (250, 375, 500); a ValueError naming the bad entry."""
    out = []
    for part in text.replace(",", " ").split():
        if not part.isdigit():
            raise TrainingInputError(f"steps entry {part!r} is invalid: give whole numbers >= 0 separated by commas, "
                                     f"e.g. 250, 375, 500, 625, 750")
        out.append(int(part))
    if not out:
        raise TrainingInputError(f"steps = {text!r} is empty: give whole numbers separated by commas, e.g. 250, 375")
    return tuple(out)


def parse_prompts(text: str) -> tuple[str, ...]:
    """One prompt per non-empty line."""
    lines = tuple(ln.strip() for ln in text.splitlines() if ln.strip())
    if not lines:
        raise TrainingInputError("prompts is empty: give one prompt per line; '{}' stands for the subject")
    return lines


# -- identities ---------------------------------------------------------------------------------------------------

@dataclass
class EvalIdentity:
    name: str
    reference: Path         # the training photo
    others: list[Path]      # T: the identity's other photos, the reference excluded


def plan_identities(root: str | Path, reference: str = "") -> tuple[list[EvalIdentity], dict[str, str]]:
    """The identities to evaluate and {name: why skipped}: an identity needs a training photo and at least one other
    photo (R-FaceSim compares with the others only). ``reference``: the training photo's file name or stem in every
    folder ("": the first file by name)."""
    kept, skipped = [], {}
    for name, files in scan_identity_folder(root):
        ref = files[0]
        if reference:
            match = [f for f in files if reference in (f.name, f.stem)]
            if not match:
                raise TrainingInputError(f"reference = {reference!r}: identity {name!r} has no photo of that name "
                                         f"(its files: {[f.name for f in files]}); name a file every identity folder "
                                         f"has, or leave it empty to train on each folder's first photo")
            ref = match[0]
        others = [f for f in files if f != ref]
        if not others:
            skipped[name] = f"only one photo ({ref.name}): R-FaceSim needs at least one other photo of the person"
            continue
        kept.append(EvalIdentity(name, ref, others))
    return kept, skipped


# -- training with snapshots ------------------------------------------------------------------------------------

def train_snapshots(trainer: LoraTrainer, steps: Sequence[int]) -> dict[int, LoraBundle]:
    """One run of ``trainer`` up to the largest of ``steps``, with the LoRA kept at each of them (0: before the first
    step). Snapshots are taken inside the run: the same run gives every row."""
    wanted, out = set(steps), {}
    if 0 in wanted:
        out[0] = trainer.bundle()
    last = max(steps)
    with trainer.session():
        while trainer.step < last:
            trainer.train_step()
            if trainer.step in wanted:
                out[trainer.step] = trainer.bundle()
    return out


# -- the loop --------------------------------------------------------------------------------------------------------

@dataclass
class _Scores:
    """What one (method, steps) row collects over the identities."""
    faces: dict[str, EmbedResult]
    facesim: list[float]
    image_feats: list[np.ndarray]
    text_feats: list[np.ndarray]
    images: int = 0
    no_face: int = 0


def evaluate_meta_lora(load_model: Callable[[], DiffusionModel], identities_dir: str | Path,
                       meta_down: dict[str, torch.Tensor], meta: dict[str, str], embedder: FaceEmbedder,
                       generate: Generate, cfg: MetaEvalConfig, detector: FaceDetector,
                       image_features: Optional[Features] = None, text_features: Optional[Features] = None,
                       clip_name: str = "", keep_images: bool = False) -> dict[str, Any]:
    """The report of the loop (module docstring): {"config", "embedder", "clip", "meta_down", "identities", "skipped",
    "rows": [one per (method, steps), in that order]}; with ``keep_images`` also "images": {(method, steps): the
    generated (N, H, W, 3) images}. ``load_model`` is called for each training run (a fresh view of the model);
    ``image_features`` / ``text_features`` give CLIP-T (both or neither; without them CLIP-T is marked not
    computed)."""
    cfg = cfg.validate()
    if (image_features is None) != (text_features is None):
        raise ValueError("give both image_features and text_features for CLIP-T, or neither")
    idents, skipped = plan_identities(identities_dir, cfg.reference)
    scores = {(m, s): _Scores({}, [], [], []) for m in cfg.methods for s in cfg.steps}
    images: dict[tuple[str, int], list[torch.Tensor]] = {k: [] for k in scores}
    others_emb, report_ids = {}, {}
    pairs = cfg.prompt_pairs()
    text = None
    if text_features is not None:
        with torch.no_grad():
            text = _rows(text_features([c for _, c, _ in pairs]))
    for ident in idents:
        rgb = read_rgb(ident.reference)
        try:
            box = largest_face_box(detector, rgb, name=str(ident.reference))
        except FaceNotFoundError as e:
            skipped[ident.name] = f"no face in the training photo {ident.reference.name}: {e}"
            continue
        others = embedder.embed([read_rgb(p) for p in ident.others])
        ref = embedder.embed([rgb])
        if not others.found or not ref.found:
            skipped[ident.name] = (f"{embedder.name} finds no face in " + (f"any of its other photos "
                                   f"{[p.name for p in ident.others]}" if not others.found else
                                   f"the training photo {ident.reference.name}"))
            continue
        crops, _ = augment(rgb, box, AugmentConfig(max_images=cfg.max_images, seed=cfg.seed,
                                                       out_area=cfg.resolution * cfg.resolution))
        report_ids[ident.name] = {"reference": ident.reference.name, "others": [p.name for p in ident.others],
                                  "others_scored": [ident.others[i].name for i in others.found], "crops": len(crops)}
        others_emb[ident.name] = others
        for method in cfg.methods:
            log.info("Meta-LoRA eval: %s, %s: %d crops, %d steps", ident.name, method, len(crops), cfg.steps[-1])
            snaps = _train(load_model(), crops, cfg, method, meta_down, meta)
            for steps, bundle in snaps.items():
                with torch.no_grad():
                    made = generate(bundle, [g for g, _, _ in pairs], [s for _, _, s in pairs])
                _score(scores[(method, steps)], ident.name, made, ref.vectors[0], embedder, image_features, text)
                if keep_images:
                    images[(method, steps)].append(made.detach().cpu())
    if not report_ids:
        raise TrainingInputError(f"no identity in {identities_dir} can be evaluated ({skipped}): every identity needs "
                                 f"a training photo and at least one other photo, each with a face")
    report = {"config": asdict(cfg), "embedder": embedder.name, "clip": clip_name or None,
              "meta_down": meta.get("idlora_name", ""), "identities": report_ids, "skipped": skipped,
              "rows": [_row(m, s, sc, others_emb, text is not None) for (m, s), sc in scores.items()]}
    if keep_images:
        report["images"] = {k: torch.cat(v) for k, v in images.items() if v}
    return report


def _train(model: DiffusionModel, crops: list[np.ndarray], cfg: MetaEvalConfig, method: str,
           meta_down: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[int, LoraBundle]:
    data = encode_crops(model, crops, fill(cfg.train_prompt, cfg.subject()))
    train_cfg = MetaStage2Config(steps=max(1, cfg.steps[-1]), learning_rate=cfg.learning_rate, rank=cfg.rank,
                                 seed=cfg.seed, targets=meta.get("idlora_targets") or "attn").validate()
    trainer = stage2_trainer(method, model, data, train_cfg, meta_down, meta)
    return train_snapshots(trainer, cfg.steps)


def _rows(x) -> np.ndarray:
    return np.asarray(x.detach().float().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)


def _score(sc: _Scores, name: str, made: torch.Tensor, ref_vec: np.ndarray, embedder: FaceEmbedder,
           image_features: Optional[Features], text: Optional[np.ndarray]) -> None:
    rgb = [(img.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8) for img in made[..., :3]]
    faces = embedder.embed(rgb)
    sc.faces[name] = faces
    sc.facesim += cosine_matrix(faces.vectors, ref_vec)[:, 0].tolist() if faces.found else []
    sc.images += len(rgb)
    sc.no_face += len(faces.missing)
    if image_features is not None:
        with torch.no_grad():
            sc.image_feats.append(_rows(image_features(made[..., :3].movedim(-1, 1).float())))
        sc.text_feats.append(text)


def _row(method: str, steps: int, sc: _Scores, others: dict[str, EmbedResult], with_clip: bool) -> dict[str, Any]:
    why_none = f"not computed: no face in any of the {sc.images} generated images"
    rfs = r_facesim(sc.faces, {k: others[k] for k in sc.faces}) if sc.faces and sc.no_face < sc.images else \
        metric_result("R-FaceSim", [], sc.no_face, note=why_none)
    fs = metric_result("FaceSim", sc.facesim, sc.no_face, **({} if sc.facesim else {"note": why_none}),
                       reference="the training photo")
    ct = clip_t(np.concatenate(sc.image_feats), np.concatenate(sc.text_feats)) if with_clip else \
        metric_result("CLIP-T", [], note=NO_CLIP)
    return {"method": method, "steps": steps, "images": sc.images, "no_face": sc.no_face,
            "R-FaceSim": rfs.as_dict(), "CLIP-T": ct.as_dict(), "FaceSim": fs.as_dict()}


# -- the table -----------------------------------------------------------------------------------------------------

def _mean(m: dict) -> Optional[float]:
    return m.get("mean")


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """TABLE_HEADER rows: raw cosines (6 decimals), '' where not computed."""
    fmt = lambda m: "" if _mean(m) is None else f"{_mean(m):.6f}"  # noqa: E731
    return [[r["method"], str(r["steps"]), *[fmt(r[k]) for k in METRICS], str(r["images"]), str(r["no_face"])]
            for r in report["rows"]]


PERCENT_HEADER = ("method", "steps", "R-FaceSim (%)", "CLIP-T (%)", "FaceSim (%)", "images", "no face")


def percent_rows(report: dict[str, Any]) -> list[list[str]]:
    """PERCENT_HEADER rows: x100 with 2 decimals, as the paper's tables print them; 'n/c' where not computed."""
    pct = lambda m: "n/c" if _mean(m) is None else f"{100 * _mean(m):.2f}"  # noqa: E731
    return [[r["method"], str(r["steps"]), *[pct(r[k]) for k in METRICS], str(r["images"]), str(r["no_face"])]
            for r in report["rows"]]


def markdown_table(report: dict[str, Any]) -> str:
    """The paper's layout (x100, as its tables print them): one row per (method, steps); 'n/c' and a note where a
    metric could not be computed."""
    lines = ["| " + " | ".join(PERCENT_HEADER) + " |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in percent_rows(report)]
    notes = {k: (r[k].get("detail") or {}).get("note", "not computed") for r in reversed(report["rows"])
             for k in METRICS if _mean(r[k]) is None}
    ids = report["identities"]
    lines += ["", f"{len(ids)} identities ({', '.join(ids)}); R-FaceSim: each generated face against the identity's "
                  f"other photos, the training photo excluded (Algorithm 3); FaceSim: against the training photo; "
                  f"face embedder {report['embedder']}; CLIP {report['clip'] or '-'}."]
    lines += [f"n/c in {k}: {v}" for k, v in notes.items()]
    if report["skipped"]:
        lines += [f"skipped {k}: {v}" for k, v in report["skipped"].items()]
    return "\n".join(lines) + "\n"


def write_eval_report(report: dict[str, Any], folder: str | Path, name: str) -> tuple[Path, Path, Path]:
    """``<folder>/<name>.json`` (the report without images), ``.csv`` (TABLE_HEADER) and ``.md``, atomically."""
    folder = Path(folder)
    body = {k: v for k, v in report.items() if k != "images"}
    json_path = write_json(folder / f"{name}.json", body)
    csv_path = folder / f"{name}.csv"
    atomic_write_bytes(csv_path, csv_text(TABLE_HEADER, table_rows(report)).encode("utf-8"))
    md_path = folder / f"{name}.md"
    atomic_write_bytes(md_path, markdown_table(report).encode("utf-8"))
    return json_path, csv_path, md_path
