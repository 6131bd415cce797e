"""Metrics as the papers define them: known answers, R-FaceSim on real photos, faces that are not found."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from idlora.models.face_embed import DlibEmbedder, EmbedResult, cosine, read_rgb
from idlora.training.metrics import (MetricResult, clip_i, clip_i_personalized, clip_i_style, clip_t,
                                     cosine_matrix, dino, facesim, r_facesim)

log = logging.getLogger(__name__)
FACES = Path(__file__).resolve().parents[1] / "assets" / "faces"


@pytest.fixture(scope="module")
def dlib_embedder():
    pytest.importorskip("dlib")
    return DlibEmbedder()


@pytest.fixture(scope="module")
def faces(dlib_embedder):
    names = ["obama", "obama2", "obama3", "biden"]
    res = dlib_embedder.embed([read_rgb(FACES / f"{n}.jpg") for n in names])
    assert res.missing == []
    return dict(zip(names, res.vectors))


# ----------------------------------------------------------------------------- R-FaceSim

def test_r_facesim_excludes_the_reference_on_real_photos(faces):
    """Identity obama = [obama (reference), obama2, obama3]. A generation that copies the
    reference scores 1.0 against it; R-FaceSim must not see that."""
    others = {"obama": [faces["obama2"], faces["obama3"]]}
    refs = {"obama": faces["obama"]}
    copy = {"obama": [faces["obama"]]}  # the pose-copying extreme: the reference itself
    robust = r_facesim(copy, others)
    biased = r_facesim(copy, others, references=refs)
    expected = (cosine(faces["obama"], faces["obama2"]) + cosine(faces["obama"], faces["obama3"])) / 2
    log.info("copy of the reference: R-FaceSim %.4f, with the reference %.4f", robust.mean, biased.mean)
    assert robust.mean == pytest.approx(expected, abs=1e-9)
    assert biased.mean == pytest.approx((2 * expected + 1.0) / 3, abs=1e-9)
    assert biased.mean - robust.mean == pytest.approx((1.0 - expected) / 3, abs=1e-9)
    assert biased.mean - robust.mean > 0.005 and 0.93 < robust.mean < 0.995
    assert robust.name == "R-FaceSim" and "included" in biased.name


def test_r_facesim_separates_identities_on_real_photos(faces):
    others = {"obama": [faces["obama2"], faces["obama3"]]}
    same = r_facesim({"obama": [faces["obama3"], faces["obama2"]]}, others)
    other = r_facesim({"obama": [faces["biden"]]}, others)
    exp_same = np.mean([(1.0 + cosine(faces["obama3"], faces["obama2"])) / 2] * 2)
    exp_other = (cosine(faces["biden"], faces["obama2"]) + cosine(faces["biden"], faces["obama3"])) / 2
    log.info("R-FaceSim obama photos %.4f, biden %.4f", same.mean, other.mean)
    assert same.mean == pytest.approx(exp_same, abs=1e-9) and same.values == pytest.approx([same.mean] * 2)
    assert other.mean == pytest.approx(exp_other, abs=1e-9) and other.mean < 0.86 < same.mean


def test_r_facesim_takes_embed_results_directly(dlib_embedder, faces):
    """The embedder's output goes straight in: faces not found are left out, on both sides."""
    photos = {n: read_rgb(FACES / f"{n}.jpg") for n in ("obama", "obama2", "obama3", "no_face")}
    others = {"obama": dlib_embedder.embed([photos["obama2"], photos["no_face"], photos["obama3"]])}
    generated = {"obama": dlib_embedder.embed([photos["no_face"], photos["obama"]])}
    res = r_facesim(generated, others)
    plain = r_facesim({"obama": [faces["obama"]]}, {"obama": [faces["obama2"], faces["obama3"]]})
    assert res.no_face == 1 and res.count == 1 and res.mean == pytest.approx(plain.mean, abs=1e-6)
    grads = [torch.tensor(faces["obama"], requires_grad=True)]  # tensors are accepted as vectors
    assert r_facesim({"obama": grads}, others).mean == pytest.approx(plain.mean, abs=1e-6)


def test_r_facesim_known_answer_pairs_vs_identities():
    e = np.eye(3)
    generated = {"a": [e[0], e[1], None], "b": [e[2]]}
    others = {"a": [e[0], e[0] + e[1]], "b": [e[2], e[0]]}
    res = r_facesim(generated, others)
    s_a = [(1 + 2 ** -0.5) / 2, (0 + 2 ** -0.5) / 2]  # S(a, g) over T(a) = {e0, (e0+e1)/sqrt2}
    s_b = [(1 + 0) / 2]
    assert res.values == pytest.approx(s_a + s_b)
    assert res.mean == pytest.approx(np.mean(s_a + s_b)) and res.count == 3 and res.no_face == 1
    assert res.detail["by_identity"] == pytest.approx({"a": np.mean(s_a), "b": s_b[0]})
    per_id = r_facesim(generated, others, average="identities")
    assert per_id.mean == pytest.approx((np.mean(s_a) + s_b[0]) / 2)
    assert per_id.mean != pytest.approx(res.mean)


def test_r_facesim_missing_faces_and_bad_inputs():
    e = np.eye(2)
    none_found = r_facesim({"a": [None, None]}, {"a": [e[0]]})
    assert none_found.mean is None and none_found.no_face == 2 and none_found.count == 0
    assert none_found.detail["by_identity"] == {"a": None} and none_found.percent is None
    empty = EmbedResult(np.zeros((0, 2), np.float32), [], [0, 1, 2])
    assert r_facesim({"a": empty}, {"a": [e[0]]}).no_face == 3
    with pytest.raises(KeyError, match="'b' has no entry in `others`"):
        r_facesim({"b": [e[0]]}, {"a": [e[0]]})
    with pytest.raises(ValueError, match="at least one real image besides the reference"):
        r_facesim({"a": [e[0]]}, {"a": [None]})
    with pytest.raises(ValueError, match="'pairs' or 'identities'"):
        r_facesim({"a": [e[0]]}, {"a": [e[0]]}, average="median")


# ----------------------------------------------------------------------------- FaceSim

def test_facesim_counts_images_without_a_face(dlib_embedder, faces):
    images = [read_rgb(FACES / n) for n in ("obama2.jpg", "no_face.jpg", "obama3.jpg")]
    res = facesim(dlib_embedder.embed(images), faces["obama"])
    expected = [cosine(faces["obama2"], faces["obama"]), cosine(faces["obama3"], faces["obama"])]
    assert isinstance(res, MetricResult)
    assert res.no_face == 1 and res.count == 2 and res.values == pytest.approx(expected, abs=1e-6)
    assert res.mean == pytest.approx(np.mean(expected), abs=1e-6)
    none = facesim(dlib_embedder.embed(images[1:2]), faces["obama"])
    assert none.mean is None and none.no_face == 1 and none.count == 0 and none.values == []
    with pytest.raises(ValueError, match="reference image has no face"):
        facesim([faces["obama2"]], None)


def test_facesim_known_answer_with_lists_and_arrays():
    ref = np.array([1.0, 0.0])
    listed = facesim([np.array([1.0, 1.0]), None, np.array([0.0, 2.0])], ref)
    assert listed.values == pytest.approx([2 ** -0.5, 0.0]) and listed.no_face == 1
    arr = facesim(np.array([[3.0, 0.0], [-1.0, 0.0]]), ref)
    assert arr.mean == pytest.approx(0.0) and arr.count == 2 and arr.no_face == 0
    assert arr.as_dict()["values"] == pytest.approx([1.0, -1.0])


# ----------------------------------------------------------------------------- CLIP / DINO

def test_clip_t_pairs_image_i_with_prompt_i():
    img = np.array([[1.0, 0.0], [0.0, 1.0]])
    txt = np.array([[1.0, 0.0], [1.0, 1.0]])
    res = clip_t(img, txt)
    assert res.values == pytest.approx([1.0, 2 ** -0.5]) and res.mean == pytest.approx((1 + 2 ** -0.5) / 2)
    assert res.percent == pytest.approx(100 * res.mean)
    one_prompt = clip_t(torch.tensor(img), torch.tensor([[0.0, 3.0]]))  # one prompt for every image
    assert one_prompt.values == pytest.approx([0.0, 1.0])
    with pytest.raises(ValueError, match="2 images vs 3 prompts"):
        clip_t(img, np.ones((3, 2)))


def test_clip_i_paired_and_pairwise_known_answers():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 1.0]])
    pairwise = clip_i(a, b)  # mean over all (a_i, b_j)
    assert pairwise.values == pytest.approx([(1 + 2 ** -0.5) / 2, (0 + 2 ** -0.5) / 2])
    assert pairwise.mean == pytest.approx((1 + 2 * 2 ** -0.5) / 4)
    paired = clip_i(a, b, paired=True)
    assert paired.values == pytest.approx([1.0, 2 ** -0.5])
    with pytest.raises(ValueError, match="compares pairs: 2 vs 1"):
        clip_i(a, b[:1], paired=True)


def test_named_uses_follow_their_papers():
    gen = np.array([[1.0, 0.0], [0.0, 1.0]])
    style = np.array([[1.0, 1.0]])  # one style image, every generation against it (DuoLoRA)
    st = clip_i_style(gen, style)
    assert st.name == "CLIP-I (style)" and st.values == pytest.approx([2 ** -0.5] * 2)
    base = np.array([[1.0, 0.0], [1.0, 0.0]])  # same prompt/seed without personalization (Meta-LoRA)
    pers = clip_i_personalized(gen, base)
    assert pers.name == "CLIP-I (personalized)" and pers.values == pytest.approx([1.0, 0.0])
    content = np.array([[0.0, 1.0], [0.0, -1.0]])
    d = dino(gen, content)
    assert d.name == "DINO" and d.values == pytest.approx([0.0, 0.0]) and d.mean == pytest.approx(0.0)


def test_feature_checks():
    with pytest.raises(ValueError, match="NaN or Inf"):
        dino(np.array([[np.nan, 1.0]]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="widths differ: 2 vs 3"):
        cosine_matrix(np.ones((1, 2)), np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"expected \(N, D\)"):
        clip_i(np.ones((1, 2, 2)), np.ones((1, 2)))
    assert cosine_matrix(np.zeros((1, 2)), np.ones((1, 2)))[0, 0] == 0.0
