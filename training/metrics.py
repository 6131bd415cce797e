"""Evaluation metrics as the IDLoRA papers define them.

All scores are plain cosine similarities in [-1, 1]; ``MetricResult.percent`` gives
them x100. The two papers report the same quantities on different scales:
Meta-LoRA (001) prints CLIP-T, CLIP-I and (R-)FaceSim as percentages (CLIP-T 31.66,
R-FaceSim 77.16), DuoLoRA (002) prints raw cosines (CLIP-T 0.314, CLIP-I 0.69,
DINO 0.56). Neither uses CLIPScore's 2.5 * max(cos, 0) rescaling.

Metric                definition (paper)
FaceSim               mean cosine of each generated face to the reference face (001, App. G)
R-FaceSim             reference EXCLUDED; each generated face against every OTHER real
                      image of its identity, averaged over those images, then over all
                      (identity, prompt) pairs (001, Algorithm 3)
CLIP-T                cosine of each generated image with its own prompt, averaged (001, 002)
CLIP-I (personalized) cosine of the personalized output with the non-personalized output of
                      the same prompt and seed, averaged over pairs (001, App. G)
CLIP-I (style)        average pairwise cosine between generated images and the style
                      image(s) (002, Sec. 5)
DINO                  average pairwise cosine of DINO embeddings of the generated and the
                      content images (002, Sec. 5; the paper's "ViT-B/6" reads as ViT-B/16)
CSD-s                 average pairwise cosine of CSD style descriptors of the generated and the
                      style images (002, Sec. 5)
DreamSim              1 - cosine of DreamSim embeddings, LOWER is closer (000)
ImageReward           mean ImageReward of each image with its prompt (003)
FID                   Frechet Inception distance to a reference set, LOWER is better (003)
                      (the networks of these four: models/csd.py, dreamsim_metric.py,
                      image_reward.py, fid_inception.py; batches: training/paper_metrics.py)

Faces: a generated image in which no face was found is counted in ``no_face`` and left
out of the mean. It is never scored as 0, and it never raises. If no image has a face, the
mean is None and ``no_face`` says how many were missed. The face model here is whatever
embedder the caller used (dlib by default). Meta-LoRA used an Inception-ResNet trained on
VGGFace2, so absolute values do not compare with its tables; rankings do.

Feature inputs are (N, D) arrays, torch tensors, or lists of vectors; for faces a list
entry may be None (no face), or pass a ``models.face_embed.EmbedResult``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Hashable, Literal, Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class MetricResult:
    """One metric over a set of items.

    mean:    the score (cosine), or None when no item could be scored.
    values:  the per-item scores the mean is taken over.
    count:   how many items were scored (len(values)).
    no_face: generated images with no detectable face (not scored, not in the mean).
    detail:  extra breakdowns, e.g. R-FaceSim's per-identity means.
    """

    name: str
    mean: Optional[float]
    values: list[float]
    count: int
    no_face: int = 0
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def percent(self) -> Optional[float]:
        """The mean x100, as Meta-LoRA's tables print it."""
        return None if self.mean is None else 100.0 * self.mean

    def as_dict(self) -> dict[str, Any]:
        """Plain types, for JSON logs."""
        return asdict(self)


def _as_matrix(x, what: str) -> np.ndarray:
    """(N, D) float64 from an array, a tensor or a list of vectors; checks finiteness."""
    if isinstance(x, (list, tuple)):
        x = [_to_numpy(v) for v in x]
    arr = np.asarray(_to_numpy(x), dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected (N, D) features, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: features contain NaN or Inf")
    return arr


def _to_numpy(x):
    """A torch tensor (any device, with or without grad) as numpy; anything else unchanged."""
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else x


def _unit(m: np.ndarray) -> np.ndarray:
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def cosine_matrix(a, b) -> np.ndarray:
    """(N, M) cosines between the rows of a (N, D) and b (M, D)."""
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    return _unit(a) @ _unit(b).T


def metric_result(name: str, values: Sequence[float], no_face: int = 0, **detail) -> MetricResult:
    """A MetricResult from per-image values (mean over them; None, with a warning, when none was scored)."""
    vals = [float(v) for v in values]
    mean = float(np.mean(vals)) if vals else None
    if mean is None and "note" not in detail:  # a note says why it was not computed (e.g. an input not connected)
        log.warning("%s: nothing to score (%d images without a face)", name, no_face)
    return MetricResult(name, mean, vals, len(vals), no_face, dict(detail))


def split_faces(generated, what: str = "generated") -> tuple[np.ndarray, int]:
    """Face vectors of the generated images, and how many had no face.

    Accepts an EmbedResult (anything with ``vectors`` and ``missing``), a list whose
    entries are vectors or None (no face), or an (N, D) array (all found).
    """
    if hasattr(generated, "vectors") and hasattr(generated, "missing"):
        vecs, missing = generated.vectors, len(generated.missing)
        return (_as_matrix(vecs, what) if len(vecs) else np.zeros((0, 0))), missing
    if isinstance(generated, (list, tuple)):
        kept = [v for v in generated if v is not None]
        missing = len(generated) - len(kept)
        return (_as_matrix(kept, what) if kept else np.zeros((0, 0))), missing
    return _as_matrix(generated, what), 0


# ----------------------------------------------------------------------------- faces

def facesim(generated, reference) -> MetricResult:
    """Conventional FaceSim: mean cosine of each generated face to the reference face.

    generated: the generated images' face vectors (EmbedResult, list with None for
               "no face", or an (N, D) array). reference: the reference face vector.
    """
    gen, no_face = split_faces(generated)
    if reference is None:
        raise ValueError("FaceSim: the reference image has no face vector (no face found in it?)")
    values = cosine_matrix(gen, reference)[:, 0] if len(gen) else []
    return metric_result("FaceSim", values, no_face)


def _test_set(identity: Hashable, others: Mapping, references: Optional[Mapping]) -> np.ndarray:
    """T for one identity: its other real images' vectors (plus the reference if given)."""
    if identity not in others:
        raise KeyError(f"R-FaceSim: identity {identity!r} has no entry in `others` (its non-reference images)")
    items = others[identity]
    items = items.as_list() if hasattr(items, "as_list") else list(items)  # EmbedResult or vectors
    rows = [v for v in items if v is not None]
    if len(rows) < len(items):
        log.warning("R-FaceSim: %d of the other images of %r have no face; left out", len(items) - len(rows), identity)
    if references is not None:
        rows.append(references[identity])
    if not rows:
        raise ValueError(f"R-FaceSim: identity {identity!r} has no other image with a face; the metric needs "
                         f"at least one real image besides the reference")
    return _as_matrix(rows, f"others[{identity!r}]")


def r_facesim(generated: Mapping[Hashable, Any], others: Mapping[Hashable, Sequence],
              references: Optional[Mapping[Hashable, Any]] = None,
              average: Literal["pairs", "identities"] = "pairs") -> MetricResult:
    """Robust FaceSim (Meta-LoRA, Algorithm 3).

    For every identity i, the reference image (the one used for fine-tuning or
    conditioning) is left out; T(i) are the other real images of i. For every
    generated image g of i (one per prompt/seed):
        S(i, g) = mean over t in T(i) of cosine(e_g, e_t)
    and R-FaceSim = mean of S over all (identity, generation) pairs, as the paper's
    ``mean{S(i,p)}``. average="identities" averages per identity first; the two agree
    when every identity has the same number of scored generations.

    generated:  identity -> its generated images' face vectors (list with None for
                "no face", an EmbedResult, or an (N, D) array).
    others:     identity -> vectors of its real images EXCEPT the reference (a list,
                an array or an EmbedResult; images without a face are left out).
    references: leave None for the paper's metric. Passing identity -> reference
                vector puts the reference back into T(i): the biased variant, used to
                measure how much pose copying inflates the score.
    values are the S(i, g); detail["by_identity"] maps identity -> mean S or None.
    """
    if average not in ("pairs", "identities"):
        raise ValueError(f"average must be 'pairs' or 'identities', got {average!r}")
    values, by_identity, no_face = [], {}, 0
    for identity, gens in generated.items():
        test = _test_set(identity, others, references)
        gen, missing = split_faces(gens, f"generated[{identity!r}]")
        no_face += missing
        scores = cosine_matrix(gen, test).mean(axis=1) if len(gen) else np.zeros(0)
        values.extend(scores.tolist())
        by_identity[identity] = float(scores.mean()) if len(scores) else None
    name = "R-FaceSim" if references is None else "R-FaceSim (reference included)"
    res = metric_result(name, values, no_face, by_identity=by_identity, average=average)
    if average == "identities":
        means = [m for m in by_identity.values() if m is not None]
        res.mean = float(np.mean(means)) if means else None
    return res


# ----------------------------------------------------------------------------- CLIP / DINO

def clip_t(image_feats, text_feats) -> MetricResult:
    """CLIP-T: cosine of each generated image with its own prompt, averaged.

    Row i of ``image_feats`` pairs with row i of ``text_feats``; a single text row is
    used for every image. Both papers: "cosine similarity between the CLIP embeddings
    of the prompt and the generated image" (ViT-B/32 in Meta-LoRA).
    """
    img, txt = _as_matrix(image_feats, "image_feats"), _as_matrix(text_feats, "text_feats")
    if len(txt) == 1:
        txt = np.repeat(txt, len(img), axis=0)
    if len(txt) != len(img):
        raise ValueError(f"CLIP-T pairs image i with prompt i: {len(img)} images vs {len(txt)} prompts")
    return metric_result("CLIP-T", _paired(img, txt))


def _paired(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    return np.sum(_unit(a) * _unit(b), axis=1)


def clip_i(a_feats, b_feats, paired: bool = False, name: str = "CLIP-I") -> MetricResult:
    """Image-image cosine of CLIP features.

    paired=False: the average over ALL pairs (a_i, b_j); values[i] is a_i's mean over b.
    paired=True:  row i of a against row i of b only (needs equal counts).
    """
    a, b = _as_matrix(a_feats, "a_feats"), _as_matrix(b_feats, "b_feats")
    if paired:
        if len(a) != len(b):
            raise ValueError(f"{name} compares pairs: {len(a)} vs {len(b)} images")
        return metric_result(name, _paired(a, b))
    return metric_result(name, cosine_matrix(a, b).mean(axis=1))


def clip_i_style(generated, style) -> MetricResult:
    """DuoLoRA's CLIP-I: style similarity.

    "The average pairwise cosine similarity between CLIP embeddings of the style and
    generated images": every generated image against every style image.
    """
    return clip_i(generated, style, paired=False, name="CLIP-I (style)")


def clip_i_personalized(personalized, non_personalized) -> MetricResult:
    """Meta-LoRA's CLIP-I: how little personalization disturbs the scene.

    "Compares the output generated with personalization against that generated
    without personalization": row i of each comes from the same prompt and seed, with
    and without the LoRA/conditioning; the cosine is taken per pair and averaged.
    """
    return clip_i(personalized, non_personalized, paired=True, name="CLIP-I (personalized)")


def dino(generated, reference) -> MetricResult:
    """DuoLoRA's DINO content score: average pairwise cosine of DINO (ViT-B/16)
    embeddings of the generated images and the content (subject) images."""
    return clip_i(generated, reference, paired=False, name="DINO")


# ----------------------------------------------------------------------------- paper metrics with their own models

def csd_style(generated, style) -> MetricResult:
    """DuoLoRA's CSD-s: average pairwise cosine of CSD style descriptors (Somepalli et al. 2024) of the
    generated and the style images, as CLIP-I (style) but in a space trained to separate styles."""
    return clip_i(generated, style, paired=False, name="CSD-s")


def dreamsim_distance(generated, reference, paired: bool = False) -> MetricResult:
    """DreamSim distance (paper 000): 1 - cosine of DreamSim embeddings, 0 for identical images, LOWER is
    closer. paired=False averages over all (generated, reference) pairs (values[i]: generated i's mean);
    paired=True compares row i with row i (e.g. each stylized output with its own input photo)."""
    res = clip_i(generated, reference, paired=paired, name="DreamSim")
    res.values = [1.0 - v for v in res.values]
    res.mean = None if res.mean is None else 1.0 - res.mean
    res.detail["note"] = "distance: lower is closer"
    return res


def image_reward(rewards: Sequence[float]) -> MetricResult:
    """ImageReward (DiffLoRA, 003): the mean of the per-image rewards (higher is better; the model's outputs
    are normalised to mean 0, std 1 over its human-preference training set)."""
    return metric_result("ImageReward", rewards)


def fid(value: float, generated: int, reference: int, **detail) -> MetricResult:
    """FID (DiffLoRA, 003; LOWER is better) as a MetricResult: one value for the whole set, ``count`` the
    generated images. FID is biased high for small sets: compare values computed on equal set sizes."""
    return MetricResult("FID", float(value), [float(value)], int(generated),
                        detail={"reference_count": int(reference), **detail})
