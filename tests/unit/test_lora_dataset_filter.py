"""The LoRA dataset builder's face filter (the paper keeps the top 85 of 100 images of each identity by face
similarity) and its crop / flip augmentation: exact selections on embeddings of known similarity, what entry.json
records, the hash, and the training inputs the augmentation makes (tiny pure-torch model, real image files)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from difflora_util import build_dataset, dataset_cfg, embed_image, write_identities
from idlora.training.difflora_data import augmented_images, identity_items
from idlora.training.lora_dataset import DatasetConfig, finished, identity_hash, select_faces
from idlora.training.lora_trainer import TrainingInputError
from tiny_torch import TinyDiffusion

FILTER_FIELDS = {"face_keep", "face_keep_fraction", "face_reference", "augment", "augment_scales", "augment_flip"}


def at_angles(degrees, dim: int = 5, norms=None) -> torch.Tensor:
    """Unit-plane vectors (cos a, sin a, 0, ...) times ``norms``: their cosine to e0 is cos a."""
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    v = torch.zeros(len(degrees), dim, dtype=torch.float64)
    v[:, 0], v[:, 1] = a.cos(), a.sin()
    return (v * torch.tensor(norms or [1.0] * len(degrees), dtype=torch.float64)[:, None]).float()


def test_filter_keeps_exactly_the_top_k_to_a_named_reference():
    # 11 images: "ref" at 0 degrees, 9 others at shuffled angles, one ("dark") without a face
    names = ["a.png", "b.png", "c.png", "dark.png", "d.png", "e.png", "ref.jpg", "f.png", "g.png", "h.png", "i.png"]
    angles = {"a.png": 50, "b.png": 5, "c.png": 80, "d.png": 30, "e.png": 10, "ref.jpg": 0, "f.png": 70,
              "g.png": 20, "h.png": 60, "i.png": 40}
    found = [i for i, n in enumerate(names) if n != "dark.png"]
    face = at_angles([angles[names[i]] for i in found], norms=[1 + i for i in range(len(found))])
    for keep, best in ((4, {"ref.jpg", "b.png", "e.png", "g.png"}), (1, {"ref.jpg"}), (20, set(angles))):
        sel = select_faces("x", names, face, found, DatasetConfig(face_keep=keep, face_reference="ref"))
        assert {names[i] for i in sel.kept} == best and sel.kept == sorted(sel.kept)  # image order kept
        assert [found[j] for j in sel.face_rows] == sel.kept
        rec = sel.record["face_filter"]
        assert rec["keep"] == len(best) and rec["no_face"] == 1 and rec["no_face_files"] == ["dark.png"]
        assert set(rec["kept"]) == best and set(rec["dropped"]) == set(angles) - best
        assert rec["similarity"]["c.png"] == pytest.approx(math.cos(math.radians(80)), abs=1e-6)
    # a fraction of all 11 images, rounded up: 0.5 -> 6 (the paper's 0.85 of 100 -> 85)
    sel = select_faces("x", names, face, found, DatasetConfig(face_keep_fraction=0.5, face_reference="ref.jpg"))
    assert {names[i] for i in sel.kept} == {"ref.jpg", "b.png", "e.png", "g.png", "d.png", "i.png"}
    assert select_faces("x", [f"{i}.png" for i in range(100)], at_angles(list(range(100))), list(range(100)),
                        DatasetConfig(face_keep_fraction=0.85, face_reference="0")).record["face_filter"]["keep"] == 85


def test_filter_to_the_mean_ranks_by_cosine_to_the_mean_direction():
    # pairs at +-a around e0: the mean of the unit vectors points along e0, whatever the vectors' norms
    degrees = [40, -40, 10, -10, 70, -70, 25, -25]
    names = [f"{i}.png" for i in range(len(degrees))]
    face = at_angles(degrees, norms=[9, 1, 1, 1, 30, 1, 1, 1])
    sel = select_faces("x", names, face, list(range(8)), DatasetConfig(face_keep=4))
    assert sel.kept == [2, 3, 6, 7]  # +-10 and +-25 degrees
    assert sel.record["face_filter"]["reference"] == "mean"
    # the brute force on random embeddings: the kept set is the top k by cosine to the normalised mean unit vector
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n, k = 12, 1 + trial % 11
        face = torch.randn(n, 16, generator=g) + 2 * torch.randn(1, 16, generator=g)
        unit = face / face.norm(dim=1, keepdim=True)
        ref = unit.mean(0) / unit.mean(0).norm()
        sims = [float(unit[i] @ ref) for i in range(n)]
        expect = set(np.argsort(sims)[::-1][:k].tolist())
        kept = select_faces("x", [f"{i}.png" for i in range(n)], face, list(range(n)), DatasetConfig(face_keep=k)).kept
        assert set(kept) == expect


def test_filter_off_keeps_everything_and_errors_name_the_fix():
    names = ["a.png", "b.png", "c.png"]
    sel = select_faces("x", names, at_angles([0, 5]), [0, 2], DatasetConfig())
    assert sel.kept == [0, 1, 2] and sel.face_rows == [0, 1]
    assert sel.record == {"face_filter": {"on": False, "images": 3, "no_face": 1}}
    with pytest.raises(TrainingInputError, match=r"face_reference = 'z' matches 0 of its images .* exactly one"):
        select_faces("x", names, at_angles([0, 5]), [0, 2], DatasetConfig(face_keep=1, face_reference="z"))
    with pytest.raises(TrainingInputError, match=r"reference image 'b.png' shows no face"):
        select_faces("x", names, at_angles([0, 5]), [0, 2], DatasetConfig(face_keep=1, face_reference="b"))
    with pytest.raises(TrainingInputError, match=r"face_keep_fraction = 0 is invalid"):
        DatasetConfig(face_keep_fraction=0).validate()
    with pytest.raises(TrainingInputError, match=r"face_keep = -1 is invalid"):
        DatasetConfig(face_keep=-1).validate()
    with pytest.raises(TrainingInputError, match=r"face_reference = 'ref.png' is invalid: .*only matters with"):
        DatasetConfig(face_reference="ref.png").validate()
    with pytest.raises(TrainingInputError, match=r"augment_scales = \(1.2,\) is invalid"):
        DatasetConfig(augment=True, augment_scales=(1.2,)).validate()


def test_filter_and_augmentation_settings_enter_the_hash_only_when_on(tmp_path):
    files = [tmp_path / "1.png"]
    files[0].write_bytes(b"x" * 10)
    assert set(asdict(DatasetConfig())) - set(DatasetConfig().hashed_settings()) == FILTER_FIELDS  # old hashes stay
    settings = [{}, {"face_keep": 85}, {"face_keep": 84}, {"face_keep_fraction": 0.85}, {"augment": True},
                {"augment": True, "augment_flip": 0.0}, {"face_keep": 85, "face_reference": "ref"}]
    hashes = [identity_hash(files, DatasetConfig(**c), "m") for c in settings]
    assert len(set(hashes)) == len(settings)  # each setting of a filter or augmentation that is on rebuilds
    assert identity_hash(files, DatasetConfig(augment_flip=0.0), "m") == hashes[0]  # off: its settings do not count


def test_build_records_the_filter_in_the_entry_and_rebuilds_when_k_changes(tmp_path):
    images = write_identities(tmp_path / "img", names=("ada",), k=3)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "ada" / "9.png")  # no face (dark)
    out = tmp_path / "ds"
    assert build_dataset(out, images, names=("ada",), face_keep=2)["trained"] == ["ada"]
    entry = json.loads((out / "ada" / "entry.json").read_text())
    rec = entry["face_filter"]
    assert rec["on"] and rec["keep"] == 2 and rec["images"] == 4 and rec["no_face_files"] == ["9.png"]
    assert len(rec["kept"]) == 2 and len(rec["dropped"]) == 1 and len(rec["similarity"]) == 3
    assert entry["images"] == entry["latents"] == entry["faces"] == 2
    kept_sims = [rec["similarity"][n] for n in rec["kept"]]
    assert min(kept_sims) >= rec["similarity"][rec["dropped"][0]]
    files = sorted((images / "ada").glob("*.png"))
    assert finished(out, "ada", identity_hash(files, dataset_cfg(face_keep=2), "tiny.safetensors"))  # a re-run skips
    assert not finished(out, "ada", identity_hash(files, dataset_cfg(face_keep=3), "tiny.safetensors"))
    assert build_dataset(out, images, names=("ada",), face_keep=3)["trained"] == ["ada"]  # k changed: rebuilt
    assert json.loads((out / "ada" / "entry.json").read_text())["face_filter"]["keep"] == 3


def gradient_image(path, w: int = 40, h: int = 32) -> np.ndarray:
    """An image with no symmetry (so a flip or a shift shows), saved losslessly."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x * y) % 251], -1).astype(np.uint8)
    Image.fromarray(img).save(path)
    return img


def test_augmentation_makes_the_described_crops_and_flips(tmp_path):
    img = gradient_image(tmp_path / "a.png")  # 40 x 32: the centre square is columns 4..35
    centre = img[:, 4:36]
    small = np.asarray(Image.fromarray(np.ascontiguousarray(centre[8:24, 8:24])).resize((32, 32),
                                                                                      Image.Resampling.LANCZOS))
    for flip in (0.0, 1.0):
        cfg = dataset_cfg(augment=True, augment_scales=(1.0, 0.5), augment_flip=flip)
        pixels, record = augmented_images([tmp_path / "a.png"], cfg)
        got = (pixels.numpy() * 255).round().astype(np.uint8)
        want = [centre, small] if flip == 0 else [centre[:, ::-1], small[:, ::-1]]
        assert got.shape == (2, 32, 32, 3)
        np.testing.assert_array_equal(got[0], want[0])  # scale 1: the centre square, as load_images takes it
        assert np.abs(got[1].astype(int) - want[1].astype(int)).max() <= 1  # scale 0.5: the centre half, resized
        assert record["augment"] == {"scales": [1.0, 0.5], "flip": flip, "images": 1, "latents": 2,
                                     "flipped": int(2 * flip)}


def test_augmentation_changes_the_training_inputs(tmp_path):
    """identity_items with augment: two latents per kept photo (the encoded crops), one prompt row each, the
    embeddings still one per photo; without it, one latent per photo."""
    (tmp_path / "ada").mkdir()
    for i in range(2):
        gradient_image(tmp_path / "ada" / f"{i}.png", w=40 + 8 * i)
    files = sorted((tmp_path / "ada").glob("*.png"))
    model = TinyDiffusion(seed=0)

    def embed_face(images01):
        return [images01[i].mean((0, 1)).numpy() for i in range(len(images01))]

    plain = identity_items(model, [("ada", files)], dataset_cfg(), embed_face, embed_image, "m")[0]
    cfg = dataset_cfg(augment=True, augment_scales=(1.0, 0.5), augment_flip=1.0)
    aug = identity_items(model, [("ada", files)], cfg, embed_face, embed_image, "m")[0]
    pixels, _ = augmented_images(files, cfg)
    assert aug.latents.shape[0] == 4 and plain.latents.shape[0] == 2
    torch.testing.assert_close(aug.latents, model.encode_images(pixels).float())
    assert not torch.allclose(aug.latents[0], plain.latents[0])  # flipped: another input
    assert all(v.shape[0] == 4 for v in aug.cond.values())
    assert aug.image.shape[0] == aug.face.shape[0] == 2 and aug.hash != plain.hash
    assert aug.record["augment"]["latents"] == 4 and aug.record["face_filter"]["on"] is False


def test_cli_flags_reach_the_config():
    import build_lora_dataset  # tools/
    base = ["--checkpoint", "c.safetensors", "--data", "d", "--out", "o", "--clip-checkpoint", "x.safetensors",
            "--face-backend", "dlib"]
    cfg = build_lora_dataset.dataset_config(build_lora_dataset.parse_args(
        [*base, "--face-keep", "85", "--face-reference", "original", "--augment", "--augment-scales", "1", "0.8"]))
    assert (cfg.face_keep, cfg.face_reference, cfg.augment, cfg.augment_scales) == (85, "original", True, (1.0, 0.8))
    cfg = build_lora_dataset.dataset_config(build_lora_dataset.parse_args(base))
    assert cfg.hashed_settings() == {k: v for k, v in asdict(cfg).items() if k not in FILTER_FIELDS}
    with pytest.raises(TrainingInputError, match=r"face_keep_fraction = 1.5 is invalid"):
        build_lora_dataset.dataset_config(build_lora_dataset.parse_args([*base, "--face-keep-fraction", "1.5"]))
