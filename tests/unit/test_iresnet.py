"""The PyTorch ArcFace port: loads an ONNX IResNet-50 and matches onnxruntime; gradients reach the image.

No real ArcFace weights exist here, so the tests export a random-weight IResNet-50 (non-trivial BatchNorm
statistics, PReLU slopes) with torch's TorchScript ONNX exporter, which folds every conv+BN pair into a biased
Conv like the real w600k_r50.onnx, and load it into a fresh module.
"""
import logging
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

from idlora.models.face_crop import ARCFACE_TEMPLATE_112, crop_faces
from idlora.models.iresnet import (ArcFaceTorch, IResNet, OnnxWeightError, iresnet, iresnet50, load_arcface_onnx,
                                   load_onnx_weights)

import onnxruntime as ort  # noqa: E402
log = logging.getLogger(__name__)


def _randomize(model: IResNet, seed: int) -> IResNet:
    """Seeded random weights, BatchNorm statistics and PReLU slopes far from their defaults; eval mode.

    Scales keep the activations of all 24 residual blocks moderate (embedding entries of order 1, as with
    real ArcFace), so that an absolute tolerance of 1e-4 means something.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                low, high = (0.1, 0.3) if name.endswith("bn3") else (0.5, 1.5)  # residual branches stay small
                m.weight.uniform_(low, high, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            elif isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.0, 0.5, generator=g)
    return model.eval()


def _export(model: IResNet, path, **kw) -> None:
    """TorchScript ONNX export (opset 17, dynamic batch); the dynamo exporter would need onnxscript."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 112, 112),), str(path), dynamo=False, opset_version=17,
                          input_names=["input.1"], output_names=["embedding"],
                          dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}}, **kw)


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    """(original module, path of its ONNX export, onnxruntime session)."""
    model = _randomize(iresnet50(), seed=0)
    path = tmp_path_factory.mktemp("arcface") / "w600k_r50_random.onnx"
    _export(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return model, path, session


def _ort(session, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {"input.1": x.numpy()})[0])


@pytest.fixture(scope="module")
def arcface50(r50) -> ArcFaceTorch:
    """A fresh IResNet-50 built and loaded from the exported file."""
    return load_arcface_onnx(r50[1])


def test_port_matches_onnxruntime(r50, arcface50):
    model, path, session = r50
    fresh = arcface50.model
    assert fresh.config.layers == (3, 4, 14, 3) and fresh.config.embedding_size == 512  # read from the file
    assert fresh.weights_source == f"{path} (by graph order and shape)"  # conv+BN folded: structural matching
    x = (torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)) - 0.5) / 0.5
    with torch.no_grad():
        ours, original = fresh(x), model(x)
    ref = _ort(session, x)
    diff = (ours - ref).abs().max().item()
    log.info("IResNet-50 port vs onnxruntime: max abs diff %.3g (embedding std %.3g)", diff, ref.std())
    assert diff <= 1e-4, diff
    assert (original - ref).abs().max() <= 1e-4


def test_embed_matches_normalised_onnxruntime(r50, arcface50):
    faces = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        emb = arcface50.embed(faces)
    ref = F.normalize(_ort(r50[2], faces * 2 - 1), dim=-1)  # insightface: (pixel - 127.5) / 127.5
    assert (emb - ref).abs().max() <= 1e-4
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def _time_per_face(fn, batch: int, repeats: int = 1) -> float:
    """Best wall time of ``fn`` over ``repeats`` calls, per face, in ms (the CPU is shared: not asserted)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1000 * best / batch


def test_gradients_flow_through_crop_and_backbone(arcface50, capsys):
    arcface = arcface50.train()  # train() must not unfreeze BatchNorm statistics
    assert not arcface.model.training and not any(p.requires_grad for p in arcface.parameters())
    image = torch.rand(1, 3, 160, 150, generator=torch.Generator().manual_seed(3), requires_grad=True)
    lmk = (ARCFACE_TEMPLATE_112 * 1.2 + 10)[None].float()
    ref = F.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(4)), dim=-1)

    def step():
        image.grad = None
        loss = (1 - F.cosine_similarity(arcface.embed(crop_faces(image, lmk)), ref)).mean()
        loss.backward()

    backward_ms = _time_per_face(step, batch=1, repeats=2)  # the first call warms up
    grad = image.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert (grad[0].abs().sum(0) > 0).float().mean() > 0.3  # the face region of a 160x150 image
    with torch.no_grad():
        forward_ms = _time_per_face(lambda: arcface.embed(torch.rand(1, 3, 112, 112)), batch=1)
    msg = (f"IResNet-50 CPU ({torch.get_num_threads()} threads) per 112x112 face: forward {forward_ms:.0f} ms, "
           f"crop+forward+backward {backward_ms:.0f} ms")
    log.info(msg)
    with capsys.disabled():
        sys.stdout.write(f"\n[timing] {msg}\n")


def _small(seed: int, layers=(1, 1, 1, 1)) -> IResNet:
    return _randomize(iresnet(layers, embedding_size=32), seed)


def test_unfolded_export_loads_by_name(tmp_path):
    model = _small(5)
    path = tmp_path / "named.onnx"
    _export(model, path, do_constant_folding=False)  # keeps the state_dict names as initializer names
    fresh = load_onnx_weights(iresnet((1, 1, 1, 1), embedding_size=32), path)
    assert fresh.weights_source.endswith("(by initializer name)")
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    """A folded export of a shallow IResNet with [2, 1, 3, 1] blocks and 32-d embeddings."""
    path = tmp_path_factory.mktemp("small") / "r_small.onnx"
    _export(_small(6, layers=(2, 1, 3, 1)), path)
    return path


def test_infer_config_reads_depth(small_onnx):
    arcface = load_arcface_onnx(small_onnx)
    assert arcface.model.config.layers == (2, 1, 3, 1) and arcface.model.config.embedding_size == 32


def test_wrong_depth_names_file_and_first_mismatch(small_onnx):
    with pytest.raises(OnnxWeightError) as err:
        load_onnx_weights(iresnet((2, 2, 3, 1), embedding_size=32), small_onnx)
    msg = str(err.value)
    # layer2.1.bn1 still fits (layer3.0.bn1 has 128 channels too); layer2.1.conv1 meets layer3.0.conv1
    assert str(small_onnx) in msg and "first mismatch at module 'layer2.1.conv1'" in msg, msg
    assert "(256, 128, 3, 3)" in msg, msg


def test_missing_and_broken_files_are_named(tmp_path):
    missing = tmp_path / "w600k_r50.onnx"
    with pytest.raises(FileNotFoundError, match="w600k_r50.onnx.*models/insightface"):
        load_arcface_onnx(missing)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf at all")
    with pytest.raises(OnnxWeightError, match="broken.onnx"):
        load_arcface_onnx(broken)


def test_embed_rejects_uncropped_images():
    arcface = ArcFaceTorch(iresnet((1, 1, 1, 1), embedding_size=32))
    with pytest.raises(ValueError, match="crop_faces"):
        arcface.embed(torch.rand(1, 3, 128, 128))
