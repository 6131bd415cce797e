"""The paper-metric nodes (FID, CSD Style Score, DreamSim, ImageReward) called in-process (ComfyUI imported).

Weights: random, of the real architectures, written under the released names into ComfyUI's models/<folder>
(tests/paper_metric_util.py); the nodes find them through folder_paths, load them through the real loaders, and
their metrics feed the Evaluation Report. A missing file is an error naming the file and the folder.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import paper_metric_util as pmu

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def mn(comfy):
    from idlora.nodes import metric_nodes
    return metric_nodes


METRIC_FOLDERS = ("fid", "csd", "dreamsim", "image_reward")


@pytest.fixture(scope="module")
def models_dir(mn):
    """ComfyUI's models folder; what the tests write into the metric folders is removed afterwards, so that later
    tests in this process (the node help's combo lists) see the folders as they were."""
    import shutil

    import folder_paths
    root = Path(folder_paths.models_dir)
    before = {p for d in METRIC_FOLDERS for p in (root / d).rglob("*")} | {root / d for d in METRIC_FOLDERS
                                                                           if (root / d).exists()}
    yield root
    for d in METRIC_FOLDERS:
        for p in sorted((root / d).rglob("*"), reverse=True) + [root / d]:
            if p.exists() and p not in before:
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def _batch(n: int, seed: int, size: int = 40) -> torch.Tensor:
    """A ComfyUI IMAGE (B, H, W, 3): smooth random colours."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 5, 5, generator=g), size=(size, size), mode="bilinear")
    return x.movedim(1, -1).contiguous()


def test_missing_weights_name_the_file_and_the_models_folder(mn, models_dir):
    from idlora.models.metric_files import ModelFilesMissing
    imgs = _batch(2, 0)
    with pytest.raises(ModelFilesMissing, match=r"FID needs weights-inception-2015-12-05-6726825d.pth in models/fid/"):
        mn.FIDScore.execute(mn.FID_WEIGHTS, imgs, imgs)
    with pytest.raises(ModelFilesMissing, match=rf"CSD needs checkpoint.pth in models/csd/ \(searched: {models_dir}"):
        mn.CSDScore.execute("checkpoint.pth", imgs, imgs)
    with pytest.raises(ModelFilesMissing, match=r"DreamSim needs dino_vitb16_pretrain.pth, .*ensemble_lora/, "
                                                r"dino_vitbase16_pretrain.pth in models/dreamsim/"):
        mn.DreamSimScore.execute("ensemble", imgs, imgs, "all pairs")
    with pytest.raises(ModelFilesMissing, match=r"ImageReward needs ImageReward.pt, vocab.txt in models/image_reward/"):
        mn.ImageRewardScore.execute(imgs, "a photo")


def test_schemas_list_the_published_file_names_first(mn):
    assert mn.FIDScore.define_schema().inputs[0].options[0] == "weights-inception-2015-12-05-6726825d.pth"
    assert mn.CSDScore.define_schema().inputs[0].options[0] == "checkpoint.pth"
    assert mn.DreamSimScore.define_schema().inputs[0].options[0] == "ensemble"


def test_fid_csd_image_reward_nodes_score_and_feed_the_report(mn, models_dir):
    from idlora.nodes import face_nodes
    pmu.write_inception(models_dir / "fid")
    pmu.write_csd(models_dir / "csd", name="csd_small.pth")
    pmu.write_image_reward(models_dir / "image_reward")
    assert "csd_small.pth" in mn.CSDScore.define_schema().inputs[0].options
    gen, ref = _batch(2, 1), _batch(2, 2, 48)
    with torch.inference_mode():  # as ComfyUI runs a prompt
        fid, fid_text, fid_metrics = mn.FIDScore.execute(mn.FID_WEIGHTS, gen, ref).args
        fid_none = mn.FIDScore.execute(mn.FID_WEIGHTS, gen).args[0]
        csd, _, csd_metrics = mn.CSDScore.execute("csd_small.pth", gen, ref[:1]).args
        reward, _, ir_metrics = mn.ImageRewardScore.execute(gen, "a photo of a person\na painting").args
    assert fid > 0 and math.isnan(fid_none) and fid_text.startswith("FID ")
    assert fid_metrics["FID"]["count"] == 2 and fid_metrics["FID"]["detail"]["reference_count"] == 2
    # reference statistics saved in models/fid, chosen by name: the same FID as the reference images give
    from idlora.models import fid_inception as fi
    feats = mn.scorer("FID", mn.FID_WEIGHTS)(ref.movedim(-1, 1))
    fi.save_statistics(models_dir / "fid" / "ref_stats.npz", fi.fid_statistics(feats), 2)
    assert mn.FIDScore.execute(mn.FID_WEIGHTS, gen, None, "ref_stats.npz").args[0] == pytest.approx(fid, rel=1e-6)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        mn.FIDScore.execute(mn.FID_WEIGHTS, gen, None, "nope.npz")
    assert -1 <= csd <= 1 and csd_metrics["CSD-s"]["count"] == 2
    assert math.isfinite(reward) and len(ir_metrics["ImageReward"]["values"]) == 2
    table, summary = face_nodes.EvaluationReport.execute("paper_metrics", fid_metrics, csd_metrics, ir_metrics).args
    assert all(k in summary for k in ("FID", "CSD-s", "ImageReward")) and table.shape[0] == 1
    with pytest.raises(ValueError, match="3 lines but images has 2"):
        mn.ImageRewardScore.execute(gen, "a\nb\nc")
