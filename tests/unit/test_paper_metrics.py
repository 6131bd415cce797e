"""FID, CSD-s, DreamSim and ImageReward: the real architectures with random weights, written under the released
file names in the released formats (tests/paper_metric_util.py), loaded through the real loading code.

Random weights carry no meaning, so the tests check what holds for any weights: shapes, determinism, identical
images -> distance 0 / similarity 1, a perturbation moves the score, FID of a set with itself ~0, the weights in
the file are the ones used, and a clear error naming the missing file and its models/ folder. The real sizes are
counted on the meta device against a count written out by hand.
"""
from __future__ import annotations

import os

import pytest
import torch

import paper_metric_util as pmu

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _images(n: int, seed: int, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 6, 6, generator=g)  # smooth images: blocks of colour, upsampled
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- FID

@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    from idlora.models.fid_inception import load_inception
    folder = tmp_path_factory.mktemp("fid")
    pmu.write_inception(folder)
    return load_inception([folder])


def test_fid_of_a_set_with_itself_is_zero_and_a_shifted_set_is_farther(inception, tmp_path):
    from idlora.models import fid_inception as fi
    from idlora.training.paper_metrics import fid_from_features, fid_metrics
    a = _images(2, 1)
    fa, fdark = inception(a), inception(a * 0.3)  # the same images, darker: a shifted set
    assert fa.shape == (2, 2048) and fa.dtype == torch.float64
    assert fa.std() > 1e-3  # features that carry the images (not collapsed by the init)
    same, shifted = fid_from_features(fa, fa), fid_from_features(fa, fdark)
    assert shifted.mean > 0 and abs(same.mean) < 1e-6 * shifted.mean
    assert same.count == 2 and same.detail["reference_count"] == 2
    # statistics saved to .npz and read back give the same FID (the CLI's --save-stats / a reference .npz)
    stats = fi.load_statistics(fi.save_statistics(tmp_path / "ref.npz", fi.fid_statistics(fdark), 2))
    assert stats[1] == 2
    # the batch path runs the network itself, deterministically: the same number again
    res = fid_metrics(inception, a, reference_stats=stats, model="m")["FID"]
    assert res.mean == pytest.approx(shifted.mean, rel=1e-9) and res.detail["model"] == "m"
    assert fid_metrics(inception, a)["FID"].mean is None  # no reference: not computed, never 0


@pytest.mark.parametrize("n", [5, 100])
def test_fast_frechet_distance_equals_torch_fidelitys(n):
    """The N x N form used for small sets is the same number as torch-fidelity's D x D formula (to 1e-6: the
    D x D eigenvalues of a rank-deficient product carry rounding noise of their own)."""
    from idlora.models import fid_inception as fi
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, 64, generator=g), torch.randn(7, 64, generator=g) * 1.5 + 0.3
    ref = fi.fid_statistics(y)
    assert fi.frechet_distance_to_features(x, ref) == pytest.approx(fi.frechet_distance(fi.fid_statistics(x), ref),
                                                                    rel=1e-6)
    assert abs(fi.frechet_distance_to_features(y, ref)) < 1e-8 * float(ref["sigma"].trace())  # FID(y, y) = 0


def test_fid_needs_two_images_and_names_the_missing_weights(tmp_path):
    from idlora.models.fid_inception import FID_WEIGHTS, fid_statistics, load_inception
    from idlora.models.metric_files import ModelFilesMissing
    with pytest.raises(ModelFilesMissing, match=rf"FID needs {FID_WEIGHTS} in models/fid/ .*{tmp_path}.*never "
                                                r"downloads"):
        load_inception([tmp_path])
    with pytest.raises(ValueError, match="at least 2 images"):
        fid_statistics(torch.zeros(1, 2048))
    (tmp_path / FID_WEIGHTS).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=f"{FID_WEIGHTS} is not a readable torch weights file"):
        load_inception([tmp_path])


# ----------------------------------------------------------------------------- CSD

def test_csd_loads_the_released_checkpoint_layout_and_scores_style(tmp_path):
    from idlora.models.csd import CSDScorer, CSDStyleEncoder
    from idlora.training.paper_metrics import csd_metrics
    path = pmu.write_csd(tmp_path)
    scorer = CSDScorer([tmp_path])
    assert scorer.model.config == pmu.CSD_TINY  # sizes read from the file
    torch.manual_seed(0)
    again = CSDStyleEncoder(**pmu.CSD_TINY)  # the same seed as the writer: the weights in the file
    saved = torch.load(path, weights_only=False)["model_state_dict"]
    assert torch.equal(scorer.model.last_layer_style, saved["module.last_layer_style"])
    assert torch.equal(scorer.model.last_layer_style, again.last_layer_style)
    imgs, style = _images(3, 1), _images(2, 2)
    feats = scorer.style_features(imgs)
    assert feats.shape == (3, 32) and torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-5)
    same = csd_metrics(scorer.style_features, style, style)["CSD-s"]
    paired_self = torch.nn.functional.cosine_similarity(scorer.style_features(style), scorer.style_features(style))
    assert torch.allclose(paired_self, torch.ones(2), atol=1e-5)
    res = csd_metrics(scorer.style_features, imgs, style)["CSD-s"]
    assert res.count == 3 and -1 <= res.mean <= 1 and res.mean < 1 - 1e-4
    assert same.mean < 1  # all pairs include different style images
    noisy = (style[:1] + 0.3 * torch.randn(style[:1].shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert csd_metrics(scorer.style_features, noisy, style[:1])["CSD-s"].mean < 1 - 1e-4  # a perturbation moves it
    # a folder's images, of different sizes, run one by one: the same image scores the same as in the batch
    listed = [imgs[0], torch.nn.functional.interpolate(imgs[1:2], size=(64, 48), mode="bilinear")[0], imgs[2]]
    by_one = csd_metrics(scorer.style_features, listed, style)["CSD-s"]
    assert by_one.count == 3 and by_one.values[0] == pytest.approx(res.values[0], abs=1e-5)
    assert by_one.values[2] == pytest.approx(res.values[2], abs=1e-5)


def test_csd_missing_and_foreign_files(tmp_path):
    from idlora.models.csd import CSDScorer
    from idlora.models.metric_files import ModelFilesMissing
    with pytest.raises(ModelFilesMissing, match=r"CSD needs checkpoint.pth in models/csd/"):
        CSDScorer([tmp_path])
    torch.save({"model_state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match="not a CSD checkpoint"):
        CSDScorer([tmp_path])


def test_csd_real_size_is_clip_vit_l14_plus_two_projections():
    from idlora.models.csd import VIT_L14, CSDStyleEncoder
    with torch.device("meta"):
        model = CSDStyleEncoder(**VIT_L14)
    w, grid = 1024, 224 // 14
    layer = 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + (4 * w * w + 4 * w) + (4 * w * w + w)
    expected = w * 3 * 14 * 14 + w + (grid * grid + 1) * w + 2 * w + 24 * layer + 2 * w + 2 * w * 768
    assert sum(p.numel() for p in model.parameters()) == expected


# ----------------------------------------------------------------------------- DreamSim

@pytest.fixture(scope="module")
def dreamsim_dir(tmp_path_factory):
    return pmu.write_dreamsim_vitb32(tmp_path_factory.mktemp("dreamsim"))


def test_dreamsim_distance_is_zero_for_identical_images_and_grows_with_noise(dreamsim_dir):
    from idlora.models.dreamsim_metric import DreamSimScorer
    from idlora.training.paper_metrics import dreamsim_metrics
    hub_dir = torch.hub.get_dir()
    scorer = DreamSimScorer([dreamsim_dir], "open_clip_vitb32")
    assert torch.hub.get_dir() == hub_dir  # the package's set_dir is undone
    _assert_adapter_loaded(scorer, dreamsim_dir, "open_clip_vitb32_single_lora")
    g = torch.Generator().manual_seed(3)
    img = _images(1, 4, 64)
    noise = torch.randn(img.shape, generator=g)
    batch = torch.cat([img, (img + 0.05 * noise).clamp(0, 1), (img + 0.5 * noise).clamp(0, 1)])
    emb = scorer.embed(batch)
    assert emb.shape == (3, 512) and torch.equal(emb, scorer.embed(batch))
    d = 1 - torch.nn.functional.cosine_similarity(emb[:1], emb, dim=-1)
    assert abs(d[0]) < 1e-5 and 0 < d[1] < d[2]
    res = dreamsim_metrics(scorer.embed, batch[1:], batch[:1].expand(2, -1, -1, -1), paired=True)["DreamSim"]
    assert res.values == pytest.approx(d[1:].tolist(), abs=1e-5) and res.detail["pairs"] == "paired"
    with pytest.raises(ValueError, match="paired DreamSim"):
        dreamsim_metrics(scorer.embed, batch, batch[:1], paired=True)


def _assert_adapter_loaded(scorer, folder, adapter):
    loaded = {n: p for n, p in scorer.model.named_parameters() if "lora_B" in n}
    saved = pmu.lora_b_of(folder, adapter)
    assert len(loaded) == len(saved) and len(saved) % 12 == 0  # 12 ViT-B blocks per extractor
    assert all(torch.equal(loaded[n.replace("lora_B.weight", "lora_B.default.weight")], v) for n, v in saved.items())


def test_dreamsim_dino_type_builds_the_dino_backbone_from_the_local_file(tmp_path):
    from idlora.models.dreamsim_metric import DreamSimScorer
    folder = pmu.write_dreamsim_dino(tmp_path)
    hub_dir = torch.hub.get_dir()
    scorer = DreamSimScorer([tmp_path / "elsewhere", folder], "dino_vitb16")
    assert torch.hub.get_dir() == hub_dir and scorer.folder == folder
    _assert_adapter_loaded(scorer, folder, "dino_vitb16_single_lora")
    backbone = torch.load(folder / "checkpoints" / "dino_vitbase16_pretrain.pth", weights_only=True)
    norm = [p for n, p in scorer.model.named_parameters() if n.endswith("extractor_list.0.model.norm.weight")]
    assert len(norm) == 1 and torch.equal(norm[0], backbone["norm.weight"].float())
    img = _images(1, 6, 64)
    emb = scorer.embed(torch.cat([img, img, img.flip(-1)]))  # the image twice, and its mirror
    assert emb.shape == (3, 768)
    d = 1 - torch.nn.functional.cosine_similarity(emb[:1], emb, dim=-1)
    assert abs(float(d[1])) < 1e-5 and float(d[2]) > 1e-4


def test_dreamsim_ensemble_concatenates_its_three_backbones_from_the_local_files(tmp_path):
    """DreamSim's default type: DINO ViT-B/16, CLIP ViT-B/16 and OpenCLIP ViT-B/16, each loaded from its file."""
    from idlora.models.dreamsim_metric import DreamSimScorer
    folder = pmu.write_dreamsim_ensemble(tmp_path)
    scorer = DreamSimScorer([folder], "ensemble")
    _assert_adapter_loaded(scorer, folder, "ensemble_lora")
    assert len(pmu.lora_b_of(folder, "ensemble_lora")) == 36
    params = dict(scorer.model.named_parameters())
    for i, name in ((1, "clip_vitb16"), (2, "open_clip_vitb16")):
        saved = torch.load(folder / f"{name}_pretrain.pth.tar", weights_only=True)["state_dict"]
        (norm,) = [p for n, p in params.items() if n.endswith(f"extractor_list.{i}.model.norm.weight")]
        assert torch.equal(norm, saved["norm.weight"].float())  # each extractor holds its own file's weights
    img = _images(1, 7, 64)
    emb = scorer.embed(torch.cat([img, img, img.flip(-1)]))
    assert emb.shape == (3, 768 + 512 + 512)  # DINO's cls token, CLIP's and OpenCLIP's projected embeddings
    d = 1 - torch.nn.functional.cosine_similarity(emb[:1], emb, dim=-1)
    assert abs(float(d[1])) < 1e-5 and float(d[2]) > 1e-4


def test_dreamsim_names_missing_files_and_builds_dino_locally(tmp_path, dreamsim_dir):
    from idlora.models import dreamsim_metric as dm
    from idlora.models.metric_files import ModelFilesMissing
    with pytest.raises(ModelFilesMissing, match=r"DreamSim needs .*ensemble_lora.* in models/dreamsim/"):
        dm.DreamSimScorer([tmp_path], "ensemble")
    with pytest.raises(ModelFilesMissing, match=r"dino_vitbase16_pretrain.pth"):
        dm.DreamSimScorer([dreamsim_dir], "dino_vitb16")
    with pytest.raises(ValueError, match="not offered"):
        dm.required_files(tmp_path, "dinov2_vitb14")
    # the DINO backbone that the package would clone from GitHub comes from DINO's released file instead
    path = pmu.write_dino_backbone(tmp_path)
    vit = dm._local_hub_load(tmp_path)("facebookresearch/dino:main", "dino_vitb16")
    assert all(torch.equal(vit.state_dict()[k], v.float()) for k, v in torch.load(path, weights_only=True).items())
    with pytest.raises(ModelFilesMissing, match="download"):
        dm._local_hub_load(tmp_path)("facebookresearch/dinov2", "dinov2_vitb14")


# ----------------------------------------------------------------------------- ImageReward

def test_image_reward_loads_the_released_key_layout_and_scores(tmp_path):
    from idlora.models.image_reward import ImageRewardScorer
    from idlora.training.paper_metrics import image_reward_metrics
    folder = pmu.write_image_reward(tmp_path)
    scorer = ImageRewardScorer([folder])
    saved = torch.load(folder / "ImageReward.pt", weights_only=True)
    qkv = scorer.model.vision.encoder.layers[1].self_attn.qkv.weight
    assert torch.equal(qkv, saved["blip.visual_encoder.blocks.1.attn.qkv.weight"])
    assert torch.equal(scorer.model.text.encoder.layer[0].crossattention.self.key.weight,
                       saved["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"])
    imgs = _images(3, 5, 40)
    prompts = ["a photo of a person", "a painting of a cat", "a red dog"]
    r = scorer.score(imgs, prompts)
    assert r.shape == (3,) and torch.equal(r, scorer.score(imgs, prompts)) and torch.isfinite(r).all()
    assert scorer.score(imgs[:1], ["a blue cat"]) != pytest.approx(scorer.score(imgs[:1], ["a photo of a person"]))
    assert scorer.score((imgs[:1] * 0.2), prompts[:1]) != pytest.approx(r[:1])  # the image matters too
    res = image_reward_metrics(scorer.score, imgs, "\n".join(prompts))["ImageReward"]
    assert res.values == pytest.approx(r.tolist(), abs=1e-6) and res.mean == pytest.approx(float(r.mean()), abs=1e-6)
    with pytest.raises(ValueError, match="3 lines but images has 2"):
        image_reward_metrics(scorer.score, imgs[:2], "\n".join(prompts))


def test_image_reward_names_missing_files(tmp_path):
    from idlora.models.image_reward import ImageRewardScorer
    from idlora.models.metric_files import ModelFilesMissing
    with pytest.raises(ModelFilesMissing, match=r"ImageReward needs ImageReward.pt, vocab.txt in models/image_reward/"):
        ImageRewardScorer([tmp_path])
    pmu.write_image_reward(tmp_path)
    (tmp_path / "vocab.txt").unlink()
    with pytest.raises(ModelFilesMissing, match=r"needs vocab.txt in models/image_reward/.*bert-base-uncased"):
        ImageRewardScorer([tmp_path])


def test_image_reward_real_size_is_blip_large_and_bert_base():
    from idlora.models.image_reward import ImageRewardModel
    with torch.device("meta"):
        model = ImageRewardModel()
    v, t, grid = 1024, 768, 224 // 16
    vision = v * 3 * 16 * 16 + v + v + (grid * grid + 1) * v + 2 * v + 24 * (
        4 * v + (3 * v * v + 3 * v) + (v * v + v) + (4 * v * v + 4 * v) + (4 * v * v + v))
    attention = lambda kv: 2 * (t * t + t) + 2 * (kv * t + t) + 2 * t  # noqa: E731  q, out, k, v, LayerNorm
    layer = attention(t) + attention(v) + (4 * t * t + 4 * t) + (4 * t * t + t) + 2 * t
    text = 30524 * t + 512 * t + 2 * t + 12 * layer
    head = sum(a * b + b for a, b in zip((t, 1024, 128, 64, 16), (1024, 128, 64, 16, 1)))
    assert sum(p.numel() for p in model.vision.parameters()) == vision
    assert sum(p.numel() for p in model.text.parameters()) == text
    assert sum(p.numel() for p in model.head.parameters()) == head


# ----------------------------------------------------------------------------- the command line

def _cli(*args: str) -> int:
    import sys
    from pathlib import Path
    tools = str(Path(__file__).resolve().parents[2] / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    import idlora_metrics
    return idlora_metrics.main(list(args))


def _write_pngs(folder, images: torch.Tensor):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(folder / f"{i:02d}.png")
    return folder


def _report(path):
    import json
    return json.loads(path.read_text())["metrics"]


def test_cli_fid_statistics_and_folders(tmp_path, capsys):
    models = tmp_path / "models"
    pmu.write_inception(models / "fid")
    gen, ref = _write_pngs(tmp_path / "gen", _images(2, 7, 40)), _write_pngs(tmp_path / "ref", _images(2, 8, 56))
    common = ["--models-dir", str(models)]
    assert _cli("fid", "--reference", str(ref), "--save-stats", str(tmp_path / "ref.npz"), *common) == 0
    assert "reference statistics of 2 images" in capsys.readouterr().out
    assert _cli("fid", "--generated", str(gen), "--reference-stats", str(tmp_path / "ref.npz"), *common,
                "--out", str(tmp_path / "a.json")) == 0
    a = _report(tmp_path / "a.json")["FID"]
    assert a["mean"] > 0 and a["count"] == 2 and a["detail"]["reference_count"] == 2
    assert (tmp_path / "a.csv").read_text().startswith("metric,mean,count")
    assert _cli("fid", "--generated", str(gen), "--reference", str(ref), "--models-dir", str(tmp_path / "none")) == 2
    assert "FID needs weights-inception-2015-12-05-6726825d.pth in models/fid/" in capsys.readouterr().err


def test_cli_csd_image_reward_dreamsim(tmp_path, capsys, dreamsim_dir):
    models = tmp_path / "models"
    pmu.write_csd(models / "csd")
    pmu.write_image_reward(models / "image_reward")
    (models / "dreamsim").symlink_to(dreamsim_dir, target_is_directory=True)
    gen = _write_pngs(tmp_path / "gen", _images(2, 9, 40))
    style = _write_pngs(tmp_path / "style", _images(1, 10, 64))
    common = ["--models-dir", str(models)]
    assert _cli("csd", "--generated", str(gen), "--style", str(style), *common, "--out", str(tmp_path / "c.json")) == 0
    assert _report(tmp_path / "c.json")["CSD-s"]["count"] == 2
    (tmp_path / "prompts.txt").write_text("a photo of a person\na red cat\n")
    assert _cli("image-reward", "--generated", str(gen), "--prompts", str(tmp_path / "prompts.txt"), *common,
                "--out", str(tmp_path / "r.json")) == 0
    rewards = _report(tmp_path / "r.json")["ImageReward"]["values"]
    assert len(rewards) == 2 and rewards[0] != rewards[1]
    assert _cli("dreamsim", "--generated", str(gen), "--reference", str(gen), "--type", "open_clip_vitb32", "--paired",
                *common, "--out", str(tmp_path / "d.json")) == 0
    d = _report(tmp_path / "d.json")["DreamSim"]
    assert d["count"] == 2 and max(abs(v) for v in d["values"]) < 1e-5  # each image against itself
    assert "DreamSim" in capsys.readouterr().out
    assert _cli("dreamsim", "--generated", str(gen), "--reference", str(gen), *common) == 2  # ensemble files absent
    assert "ensemble_lora" in capsys.readouterr().err
