"""Face embedders on real public-domain photos (dlib), and open_clip plumbing on tiny random models."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from idlora.models.face_embed import (DLIB_LANDMARKS5, DLIB_RECOGNITION, DLIB_SAME_PERSON_L2, DlibEmbedder,
                                      EmbedResult, FaceEmbedder, OpenClipScorer, TorchEmbedder, cosine, l2,
                                      read_rgb)
from idlora.training.metrics import clip_t

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger(__name__)
FACES = Path(__file__).resolve().parents[1] / "assets" / "faces"
PEOPLE = ["obama", "obama2", "obama3", "biden", "astronaut"]


@pytest.fixture(scope="module")
def dlib_embedder():
    pytest.importorskip("dlib")
    return DlibEmbedder()


@pytest.fixture(scope="module")
def photos():
    return {n: read_rgb(FACES / f"{n}.jpg") for n in PEOPLE + ["no_face"]}


@pytest.fixture(scope="module")
def vecs(dlib_embedder, photos):
    res = dlib_embedder.embed([photos[n] for n in PEOPLE])
    assert res.found == list(range(len(PEOPLE))) and res.missing == []
    return dict(zip(PEOPLE, res.vectors))


def test_dlib_same_person_is_closer_than_different_people(vecs):
    same = [("obama", "obama2"), ("obama", "obama3"), ("obama2", "obama3")]
    diff = [(a, b) for a in ("obama", "obama2", "obama3") for b in ("biden", "astronaut")] + [("biden", "astronaut")]
    for a, b in same + diff:
        log.info("%s vs %s: cosine %.4f, L2 %.4f", a, b, cosine(vecs[a], vecs[b]), l2(vecs[a], vecs[b]))
    cos_same = [cosine(vecs[a], vecs[b]) for a, b in same]
    cos_diff = [cosine(vecs[a], vecs[b]) for a, b in diff]
    assert min(cos_same) > 0.93 and max(cos_diff) < 0.86, (cos_same, cos_diff)
    assert min(cos_same) > max(cos_diff) + 0.08
    assert max(l2(vecs[a], vecs[b]) for a, b in same) < DLIB_SAME_PERSON_L2
    assert min(l2(vecs[a], vecs[b]) for a, b in diff) > DLIB_SAME_PERSON_L2


def test_dlib_reports_images_without_a_face(dlib_embedder, photos):
    res = dlib_embedder.embed([photos["no_face"], photos["obama"], photos["no_face"]])
    assert isinstance(dlib_embedder, FaceEmbedder) and not dlib_embedder.differentiable
    assert res.found == [1] and res.missing == [0, 2]
    assert res.vectors.shape == (1, 128) and res.vectors.dtype == np.float32 and len(res.boxes) == 1
    listed = res.as_list()
    assert listed[0] is None and listed[2] is None and np.array_equal(listed[1], res.vectors[0])
    empty = dlib_embedder.embed([photos["no_face"]])
    assert empty.vectors.shape == (0, 128) and empty.found == [] and empty.missing == [0]


def test_dlib_accepts_float_and_rgba_images(dlib_embedder, photos, vecs):
    img = photos["obama"]
    as_float = img.astype(np.float32) / 255.0
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=2)
    res = dlib_embedder.embed([as_float, rgba])
    assert res.found == [0, 1]
    assert np.allclose(res.vectors, vecs["obama"][None], atol=1e-5)
    with pytest.raises(ValueError, match=r"image 0: expected \(H, W, 3\)"):
        dlib_embedder.embed([img[..., 0]])


def test_dlib_cnn_detector_agrees_with_hog(photos, vecs):
    pytest.importorskip("dlib")
    small = photos["obama"][::2, ::2].copy()  # 240 px: keeps the CPU CNN quick
    res = DlibEmbedder(detector="cnn", upsample=1).embed([small])
    assert res.found == [0] and cosine(res.vectors[0], vecs["obama"]) > 0.95


def test_dlib_missing_model_file_names_folder_and_file(tmp_path):
    pytest.importorskip("dlib")
    with pytest.raises(FileNotFoundError, match=f"{DLIB_LANDMARKS5}.*{tmp_path}"):
        DlibEmbedder(model_dir=tmp_path)
    (tmp_path / DLIB_LANDMARKS5).symlink_to(_frm_dir() / DLIB_LANDMARKS5)
    with pytest.raises(FileNotFoundError, match=f"{DLIB_RECOGNITION}.*{tmp_path}"):
        DlibEmbedder(model_dir=tmp_path)
    with pytest.raises(ValueError, match="'hog' or 'cnn'"):
        DlibEmbedder(detector="yolo")


def _frm_dir() -> Path:
    frm = pytest.importorskip("face_recognition_models")
    return Path(frm.face_recognition_model_location()).parent


def test_cosine_and_l2_known_answers():
    assert cosine([1, 0], [0, 1]) == pytest.approx(0.0)
    assert cosine([1, 1], [2, 2]) == pytest.approx(1.0)
    assert cosine([1, 0], [-3, 0]) == pytest.approx(-1.0)
    assert cosine([0, 0], [1, 0]) == 0.0  # no division by zero
    assert l2([0, 0], [3, 4]) == pytest.approx(5.0)
    rows = cosine(np.array([[1, 0], [0, 1], [1, 1]]), np.array([1, 0]))
    assert rows.shape == (3,) and np.allclose(rows, [1, 0, 2 ** -0.5])
    assert np.allclose(l2(np.eye(2), [0, 0]), [1, 1])


# ----------------------------------------------------------------------------- TorchEmbedder

def _linear_fn(dim: int = 4):
    weight = torch.randn(3, dim, generator=torch.Generator().manual_seed(0))
    return lambda x: x.mean(dim=(2, 3)) @ weight


def test_torch_embedder_shapes_gradients_and_errors():
    emb = TorchEmbedder(_linear_fn(), "linear", 4)
    assert isinstance(emb, FaceEmbedder) and emb.differentiable
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = emb(x)
    out.sum().backward()
    assert out.shape == (2, 4) and x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"linear: expected a float \(B, 3, H, W\)"):
        emb(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r"fn returned \(2, 4\), expected \(2, 5\)"):
        TorchEmbedder(_linear_fn(), "wrong", 5)(x)


def test_torch_embedder_with_a_cropper_reports_missing_faces(photos):
    no_face_shape = photos["no_face"].shape
    emb = TorchEmbedder(_linear_fn(), "linear", 4,
                        crop=lambda im: None if im.shape == no_face_shape else im[:64, :64])
    res = emb.embed([photos["no_face"], photos["obama"]])
    assert res.found == [1] and res.missing == [0] and res.vectors.shape == (1, 4)
    expected = emb(torch.from_numpy(photos["obama"][:64, :64].copy()).permute(2, 0, 1)[None].float() / 255)
    assert np.allclose(res.vectors[0], expected[0].detach().numpy(), atol=1e-6)
    whole = TorchEmbedder(_linear_fn(), "linear", 4).embed([photos["no_face"]])
    assert whole.found == [0] and whole.missing == []


def test_torch_embedder_on_dlib_chips(dlib_embedder, photos):
    emb = TorchEmbedder(_linear_fn(), "chip", 4, crop=dlib_embedder.crop)
    res = emb.embed([photos["obama"], photos["no_face"]])
    assert isinstance(res, EmbedResult) and res.found == [0] and res.missing == [1]
    assert dlib_embedder.crop(photos["obama"]).shape == (150, 150, 3)


# ----------------------------------------------------------------------------- open_clip

TINY = {"embed_dim": 8,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    path = tmp_path_factory.mktemp("clipcfg") / "idlora-tiny-test.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    return path.stem


def _scorer(arch: str, seed: int = 0, **kw) -> OpenClipScorer:
    torch.manual_seed(seed)
    return OpenClipScorer(arch, **kw)


def test_open_clip_shapes_norms_and_determinism(tiny_arch):
    scorer = _scorer(tiny_arch)
    images = torch.rand(3, 3, 40, 60, generator=torch.Generator().manual_seed(1))
    img = scorer.image_features(images)
    txt = scorer.text_features(["a photo of a person", "a watercolor painting"])
    assert scorer.dim == 8 and img.shape == (3, 8) and txt.shape == (2, 8)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.equal(img, scorer.image_features(images))
    assert torch.equal(img, _scorer(tiny_arch).image_features(images))  # same seed, same weights
    assert not torch.allclose(img[0], img[1])  # the pixels reach the features
    assert scorer.preprocess(images).shape == (3, 3, 32, 32)


def test_open_clip_image_features_are_differentiable(tiny_arch):
    scorer = _scorer(tiny_arch)
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    scorer.image_features(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in scorer.model.parameters())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_open_clip_checkpoint_round_trip(tiny_arch, tmp_path, suffix):
    source = _scorer(tiny_arch, seed=1)
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    loaded = _scorer(tiny_arch, seed=2, checkpoint=path.name, clip_dir=tmp_path)
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded.image_features(images), source.image_features(images), atol=1e-6)
    assert torch.allclose(loaded.text_features(["x"]), source.text_features(["x"]), atol=1e-6)


def test_open_clip_errors_name_file_and_folder(tiny_arch, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'nope.safetensors' not found in .*models/clip"):
        _scorer(tiny_arch, checkpoint="nope.safetensors")
    with pytest.raises(FileNotFoundError, match=f"not found in {tmp_path}"):
        _scorer(tiny_arch, checkpoint="nope.safetensors", clip_dir=tmp_path)
    bad = tmp_path / "bad.pt"
    torch.save({"visual.proj": torch.zeros(2, 2)}, bad)
    with pytest.raises((ValueError, RuntimeError), match="bad.pt"):
        _scorer(tiny_arch, checkpoint=bad)


def _set_constant_towers(scorer: OpenClipScorer, u: torch.Tensor, v: torch.Tensor) -> None:
    """Image tower outputs u and text tower v for every input (zero-gain final norms)."""
    m = scorer.model
    with torch.no_grad():
        for norm in (m.visual.ln_post, m.ln_final):
            norm.weight.zero_()
            norm.bias.zero_()
            norm.bias[0] = 1.0
        m.visual.proj.zero_()
        m.visual.proj[0] = u
        m.text_projection.zero_()
        m.text_projection[0] = v


def test_clip_t_known_answer_with_hand_set_weights(tiny_arch):
    scorer = _scorer(tiny_arch)
    u = torch.tensor([3.0, 4.0, 0, 0, 0, 0, 0, 0])
    v = torch.tensor([4.0, 3.0, 0, 0, 0, 0, 0, 0])
    _set_constant_towers(scorer, u, v)
    img = scorer.image_features(torch.rand(2, 3, 32, 32))
    txt = scorer.text_features(["a dog", "a portrait of a man in a hat"])
    assert torch.allclose(img, (u / 5).expand(2, 8), atol=1e-6)
    res = clip_t(img, txt)
    assert res.mean == pytest.approx(24 / 25, abs=1e-6) and res.count == 2  # (3*4 + 4*3) / (5*5)
    assert res.percent == pytest.approx(96.0, abs=1e-4)
