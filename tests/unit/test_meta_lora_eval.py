"""The Meta-LoRA evaluation loop's core (training/meta_lora_eval.py) on the tiny torch model with the built-in
detector and dlib: one row per (method, steps); R-FaceSim compares the generated faces with the identity's OTHER photos
only (an identity trained on Biden whose other photos are Obama's: the score changes if the training photo is let in,
and it is exactly the score over the others); snapshots of one run equal separate runs; the LoRA + augmented inputs
baseline is a plain LoRA on the Meta-Down's layers; bad settings are named."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from idlora.models.face_embed import DlibEmbedder, read_rgb
from idlora.training.config import TrainingInputError
from idlora.training.evaluate import make_detector
from idlora.training.lora_format import LoraBundle
from idlora.training.meta_lora import (LoraAugTrainer, MetaLoraStage1, MetaStage2Config, load_meta_down,
                                       save_meta_down, stage2_trainer)
from idlora.training.meta_lora_eval import (MetaEvalConfig, evaluate_meta_lora, parse_steps, plan_identities,
                                            train_snapshots, write_eval_report)
from idlora.training.metrics import cosine_matrix
from meta_lora_util import crops, identity_set, stage1_cfg
from tiny_torch import TinyDiffusion

FACES = Path(__file__).resolve().parents[1] / "assets" / "faces"
GENERATED = "biden.jpg"  # what the stand-in generator returns for every prompt


@pytest.fixture(scope="module")
def model():
    return TinyDiffusion(seed=0)


@pytest.fixture(scope="module")
def meta_down(model, tmp_path_factory):
    trainer = MetaLoraStage1(model, identity_set(model), stage1_cfg(steps=4))
    trainer.run()
    path = tmp_path_factory.mktemp("md") / "md.safetensors"
    save_meta_down(path, trainer.network, trainer.meta_down_metadata("md"))
    return load_meta_down(path)


@pytest.fixture(scope="module")
def dlib():
    return DlibEmbedder()


def identities(root: Path) -> Path:
    """a: trained on Biden, its other photos are Obama's (so the training photo differs from the rest); b: trained on
    obama3, the other photo is the astronaut's; c: one photo only (skipped: nothing to compare with)."""
    for ident, files in {"a": ["biden.jpg", "obama.jpg", "obama2.jpg"], "b": ["obama3.jpg", "astronaut.jpg"],
                         "c": ["obama.jpg"]}.items():
        (root / ident).mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copy(FACES / f, root / ident / (f"0_train{Path(f).suffix}" if i == 0 else f))
    return root


class PhotoGenerator:
    """Stands in for ComfyUI's sampler (no model here makes faces): every 'generated' image is a real photo, so that
    the face metrics have faces to score. Records what it was asked."""

    def __init__(self):
        self.photo = torch.from_numpy(read_rgb(FACES / GENERATED).copy()).float() / 255
        self.calls: list[tuple[LoraBundle | None, list[str], list[int]]] = []

    def __call__(self, lora, prompts, seeds):
        self.calls.append((lora, prompts, seeds))
        return self.photo[None].repeat(len(prompts), 1, 1, 1)


_VECTORS: dict[str, np.ndarray] = {}


def vector(dlib, photo: str) -> np.ndarray:
    if photo not in _VECTORS:
        _VECTORS[photo] = dlib.embed([read_rgb(FACES / photo)]).vectors[0]
    return _VECTORS[photo]


def mean_cos(dlib, gen: str, photos: list[str]) -> float:
    return float(cosine_matrix(vector(dlib, gen), np.stack([vector(dlib, p) for p in photos])).mean())


def test_one_row_per_method_and_steps_and_r_facesim_leaves_the_training_photo_out(model, meta_down, dlib, tmp_path):
    gen = PhotoGenerator()
    cfg = MetaEvalConfig(steps=(3, 1), prompts=("a photo of {}, looking at the camera",), max_images=3,
                         resolution=64, learning_rate=1e-2, reference="0_train")
    report = evaluate_meta_lora(lambda: model, identities(tmp_path / "ids"), *meta_down, dlib, gen, cfg,
                                make_detector("retinaface"))
    assert [(r["method"], r["steps"]) for r in report["rows"]] == [
        ("meta_lora", 1), ("meta_lora", 3), ("lora_aug", 1), ("lora_aug", 3)]
    assert report["identities"]["a"]["reference"] == "0_train.jpg"
    assert report["identities"]["a"]["others_scored"] == ["obama.jpg", "obama2.jpg"]
    assert report["identities"]["b"]["others_scored"] == ["astronaut.jpg"]
    assert "only one photo" in report["skipped"]["c"]
    # the paper's R-FaceSim: each identity's generated faces against its other photos only, averaged over the
    # (identity, image) pairs; with the training photo let in (the biased variant) it would be far higher
    excluded = [mean_cos(dlib, GENERATED, ["obama.jpg", "obama2.jpg"]), mean_cos(dlib, GENERATED, ["astronaut.jpg"])]
    included = [mean_cos(dlib, GENERATED, ["obama.jpg", "obama2.jpg", "biden.jpg"]),
                mean_cos(dlib, GENERATED, ["astronaut.jpg", "obama3.jpg"])]
    assert np.mean(included) - np.mean(excluded) > 0.02  # the test can tell them apart
    facesim = np.mean([mean_cos(dlib, GENERATED, ["biden.jpg"]), mean_cos(dlib, GENERATED, ["obama3.jpg"])])
    for row in report["rows"]:
        assert row["R-FaceSim"]["mean"] == pytest.approx(np.mean(excluded), abs=1e-6)
        assert row["R-FaceSim"]["detail"]["by_identity"]["a"] == pytest.approx(excluded[0], abs=1e-6)
        assert row["FaceSim"]["mean"] == pytest.approx(facesim, abs=1e-6)
        assert (row["images"], row["no_face"]) == (2, 0)
        assert row["CLIP-T"]["mean"] is None and "no CLIP model" in row["CLIP-T"]["detail"]["note"]
    # one training run per (identity, method), a snapshot generated at each step count, the same prompts and seeds
    assert len(gen.calls) == 2 * 2 * 2
    assert {tuple(p) for _, p, _ in gen.calls} == {("a photo of sks person, looking at the camera",)}
    assert {tuple(s) for _, _, s in gen.calls} == {(0,)}
    methods = [c[0].metadata["idlora_method"] for c in gen.calls]
    assert methods == ["meta_lora"] * 2 + ["lora_aug"] * 2 + ["meta_lora"] * 2 + ["lora_aug"] * 2
    assert [int(c[0].metadata["ss_steps"]) for c in gen.calls] == [1, 3] * 4

    paths = write_eval_report(report, tmp_path / "out", "eval")
    rows = list(csv.reader(paths[1].open()))
    assert rows[0] == ["method", "steps", "R-FaceSim", "CLIP-T", "FaceSim", "images", "no_face"]
    assert [r[:2] for r in rows[1:]] == [["meta_lora", "1"], ["meta_lora", "3"], ["lora_aug", "1"], ["lora_aug", "3"]]
    assert rows[1][3] == ""  # CLIP-T not computed
    md = paths[2].read_text()
    assert f"| meta_lora | 3 | {100 * np.mean(excluded):.2f} | n/c |" in md and "n/c in CLIP-T: not computed" in md


def test_clip_t_with_clip_features(model, meta_down, dlib, tmp_path):
    """CLIP-T pairs each image with its prompt, the subject given as the class word only (no rare token)."""
    seen = []

    def text_features(prompts):
        seen.extend(prompts)
        return torch.tensor([[1.0, float(len(p)), 0.0] for p in prompts])

    def image_features(images01):  # (B, 3, H, W) -> (B, 3)
        return images01.mean(dim=(2, 3))

    cfg = MetaEvalConfig(methods=("lora_aug",), steps=(2,), prompts=("a {} smiling", "a {} in a garden"),
                         max_images=2, resolution=64)
    report = evaluate_meta_lora(lambda: model, identities(tmp_path / "ids"), *meta_down, dlib, PhotoGenerator(), cfg,
                                make_detector("retinaface"), image_features, text_features, clip_name="fake")
    [row] = report["rows"]
    img = image_features(PhotoGenerator().photo[None].movedim(-1, 1))[0].numpy()
    want = [float(cosine_matrix(img, text_features([p]).numpy())[0, 0]) for p in ("a person smiling",
                                                                                  "a person in a garden")]
    assert seen[:2] == ["a person smiling", "a person in a garden"]
    assert row["CLIP-T"]["count"] == 4 and row["CLIP-T"]["mean"] == pytest.approx(np.mean(want), abs=1e-6)


def test_snapshots_of_one_run_equal_separate_runs(model, meta_down):
    weights, meta = meta_down
    data = crops(model, 2)
    for method in ("meta_lora", "lora_aug"):
        cfg = MetaStage2Config(steps=4, learning_rate=1e-2, targets="attn")
        snaps = train_snapshots(stage2_trainer(method, model, data, cfg, weights, meta), (0, 2, 4))
        assert sorted(snaps) == [0, 2, 4]
        assert all(float(w.up.abs().max()) == 0 for w in snaps[0].weights.values())  # the base model
        alone = stage2_trainer(method, model, data, MetaStage2Config(steps=2, learning_rate=1e-2, targets="attn"),
                               weights, meta).run()
        for name, w in alone.weights.items():
            assert torch.allclose(w.down, snaps[2].weights[name].down, atol=1e-6)
            assert torch.allclose(w.up, snaps[2].weights[name].up, atol=1e-6)
        assert not torch.allclose(snaps[2].weights[name].up, snaps[4].weights[name].up)


def test_lora_aug_is_a_plain_lora_on_the_meta_down_layers(model, meta_down):
    weights, meta = meta_down
    trainer = stage2_trainer("lora_aug", model, crops(model, 2), MetaStage2Config(steps=3, learning_rate=1e-2,
                                                                                 rank=1), weights, meta)
    assert isinstance(trainer, LoraAugTrainer) and sorted(trainer.network.names) == sorted(weights)
    before = {n: (layer.down.detach().clone(), layer.up.detach().clone()) for n, layer in trainer.network.items()}
    bundle = trainer.run()
    assert bundle.metadata["idlora_method"] == "lora_aug"
    for name, w in bundle.weights.items():
        assert w.down.shape[0] == 1 and w.alpha == 1.0
        assert not torch.equal(w.down, before[name][0]) and not torch.equal(w.up, before[name][1])  # both train
    with pytest.raises(TrainingInputError, match="method = 'dora' is invalid"):
        stage2_trainer("dora", model, crops(model, 1), MetaStage2Config(steps=1), weights, meta)
    with pytest.raises(TrainingInputError, match="init_lora is connected, but method = 'lora_aug'"):
        stage2_trainer("lora_aug", model, crops(model, 1), MetaStage2Config(steps=1), weights, meta, init_lora=bundle)


def test_bad_settings_are_named(tmp_path):
    assert parse_steps("250, 375 500") == (250, 375, 500)
    with pytest.raises(TrainingInputError, match="steps entry 'x' is invalid"):
        parse_steps("250, x")
    with pytest.raises(TrainingInputError, match="methods = .* is invalid"):
        MetaEvalConfig(methods=("meta_lora", "dora")).validate()
    with pytest.raises(TrainingInputError, match="steps = .* is invalid"):
        MetaEvalConfig(steps=(250, 250)).validate()
    assert MetaEvalConfig(steps=(750, 250)).validate().steps == (250, 750)
    root = identities(tmp_path / "ids")
    with pytest.raises(TrainingInputError, match="reference = 'front': identity 'a' has no photo of that name"):
        plan_identities(root, "front")
