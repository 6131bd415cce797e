"""The pack's Flux LoRA files against the real readers: ComfyUI's stock LoraLoaderModelOnly patches every module of a
LoRA trained on a tiny Flux-architecture DiT by exactly base + alpha / rank * up @ down (and unpatches it), and
diffusers' kohya-Flux converter + peft injection (FluxPipeline.lora_state_dict / load_lora_into_transformer) splits
each fused module into the diffusers layers, with the rows and the scale of our delta.

diffusers 0.39's converter hard-codes Flux-dev's widths for a single block's linear1 (dims [3072, 3072, 3072, 12288]),
so a kohya Flux LoRA of a narrower model (the tiny one here, hidden 64) fails there whoever wrote it. The trained tiny
file is therefore checked at its own width for every other module, and the split of linear1 is checked on a file the
pack writes for a Flux-dev-width DiT (ComfyUI's and diffusers' models on the meta device: names and shapes only; the
diffusers one gets uninitialised, never-read CPU storage so that peft's LoRA layers hold real values).
"""
from __future__ import annotations

import logging
import re
import traceback
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.comfy

RANK, ALPHA = 4, 6.0  # alpha != rank: the scale alpha / rank = 1.5 must come through
ADAPTER = "idlora"


@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    import folder_paths
    loras = tmp_path_factory.mktemp("flux_loras")
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    return loras


@pytest.fixture(scope="module")
def trained(env):
    """A LoRA trained (3 steps) on the tiny Flux with targets flux_all_linear, saved by the pack (save_bundle)."""
    import comfy_tiny
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.lora_format import save_bundle
    from idlora.training.lora_trainer import LoraTrainConfig, LoraTrainer, TrainData

    patcher = comfy_tiny.tiny_flux(seed=0)
    data = TrainData(torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1)),
                     comfy_tiny.tiny_flux_cond(2, 1))
    config = LoraTrainConfig(steps=3, learning_rate=5e-2, rank=RANK, alpha=ALPHA, targets="flux_all_linear")
    trainer = LoraTrainer(ComfyDiffusion(patcher, load="none"), data, config)  # "none": the model stays unpatched
    bundle = trainer.run()
    name = "idlora_tiny_flux_all_linear.safetensors"
    path = Path(save_bundle(env / name, bundle, torch.float32, idlora_base_model="flux"))
    return types.SimpleNamespace(patcher=patcher, trainer=trainer, bundle=bundle, name=name, path=path)


@pytest.fixture
def diffusers_warnings():
    """WARNING+ records of the diffusers and peft loggers (diffusers' root logger does not propagate)."""
    import diffusers.utils.logging as dlog
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [dlog._get_library_root_logger(), logging.getLogger("peft")]
    for lg in loggers:
        lg.addHandler(handler)
    yield records
    for lg in loggers:
        lg.removeHandler(handler)


def _file_modules(sd: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """kohya stem -> (down, up, scale = alpha / rank) of a kohya LoRA state dict; every stem has all three keys."""
    stems = {k.rsplit(".", 2)[0] for k in sd if k.endswith((".lora_down.weight", ".lora_up.weight"))}
    stems |= {k[:-len(".alpha")] for k in sd if k.endswith(".alpha")}
    out = {}
    for s in sorted(stems):
        down, up, alpha = sd[f"{s}.lora_down.weight"], sd[f"{s}.lora_up.weight"], sd[f"{s}.alpha"]
        out[s] = (down.float(), up.float(), float(alpha) / down.shape[0])
    assert len(sd) == 3 * len(out), sorted(set(sd) - {f"{s}.{x}" for s in out for x in
                                                   ("lora_down.weight", "lora_up.weight", "alpha")})
    return out


# ------------------------------------------------------------------------------------ ComfyUI's stock LoraLoader

def test_stock_lora_loader_patches_every_flux_module_by_the_files_delta(trained):
    import comfy.model_management
    import nodes
    from idlora.models.lora import select_targets

    patcher, bundle = trained.patcher, trained.bundle
    dit = patcher.model.diffusion_model
    modules = _file_modules(load_file(str(trained.path)))
    targets = select_targets(dit, "flux_all_linear")
    # the file: one kohya module (lora_unet_<path with _>) per target the preset selects, 1 double + 1 single block
    stem_to_path = {"lora_unet_" + p.replace(".", "_"): p for p in targets}
    assert set(modules) == set(stem_to_path) and len(modules) == 10, sorted(modules)
    for stem, (down, up, scale) in modules.items():
        layer = trained.trainer.network.layer(stem_to_path[stem])  # the file holds what was trained
        assert torch.equal(down, layer.down.detach()) and torch.equal(up, layer.up.detach()), stem
        assert scale == pytest.approx(ALPHA / RANK) and up.abs().max() > 0, (stem, scale)
    assert set(bundle.weights) == set(targets)

    base = {k: v.detach().clone() for k, v in dit.state_dict().items()}
    (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, trained.name, 1.0)
    # (a) every module of the file is patched, nothing else
    assert set(patched.patches) == {f"diffusion_model.{p}.weight" for p in stem_to_path.values()}
    assert all(len(v) == 1 for v in patched.patches.values())
    assert not patcher.patches, "the loader must patch a clone"

    # (b) the weights ComfyUI patches in = base + alpha / rank * up @ down, for every module
    comfy.model_management.load_models_gpu([patched])
    try:
        now = {k: v.detach().clone() for k, v in dit.state_dict().items()}
    finally:
        comfy.model_management.unload_all_models()  # (c) ComfyUI's own unpatching
    for stem, (down, up, scale) in modules.items():
        key = f"{stem_to_path[stem]}.weight"
        expected = base[key] + scale * (up @ down)
        torch.testing.assert_close(now[key], expected, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
        assert (now[key] - base[key]).abs().max() > 1e-4, f"{key} did not move"
    untouched = set(base) - {f"{p}.weight" for p in stem_to_path.values()}
    assert [k for k in untouched if not torch.equal(now[k], base[k])] == []

    # (c) unpatching restores the base weights exactly
    after = dit.state_dict()
    assert [k for k, v in base.items() if not torch.equal(after[k], v)] == []


# ------------------------------------------------------------------------------------ diffusers' Flux LoRA loader

def _diffusers_split(stem: str, hidden: int) -> list[tuple[str, slice]]:
    """The diffusers modules (FluxTransformer2DModel names) a kohya Flux stem becomes, with the rows of the fused
    delta each gets (the diffusers layout, written out here independently of diffusers' converter)."""
    all_rows, qkv = slice(None), [slice(0, hidden), slice(hidden, 2 * hidden), slice(2 * hidden, 3 * hidden)]
    if m := re.fullmatch(r"lora_unet_double_blocks_(\d+)_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2)", stem):
        i, stream, part = m.groups()
        blk = f"transformer_blocks.{i}"
        if part == "attn_qkv":
            names = ("to_q", "to_k", "to_v") if stream == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
            return [(f"{blk}.attn.{n}", rows) for n, rows in zip(names, qkv)]
        ff = "ff" if stream == "img" else "ff_context"
        return [({("img", "attn_proj"): f"{blk}.attn.to_out.0", ("txt", "attn_proj"): f"{blk}.attn.to_add_out",
                  (stream, "mlp_0"): f"{blk}.{ff}.net.0.proj", (stream, "mlp_2"): f"{blk}.{ff}.net.2"}[stream, part],
                 all_rows)]
    if m := re.fullmatch(r"lora_unet_single_blocks_(\d+)_linear([12])", stem):
        blk = f"single_transformer_blocks.{m.group(1)}"
        if m.group(2) == "2":
            return [(f"{blk}.proj_out", all_rows)]
        return [(f"{blk}.attn.{n}", rows) for n, rows in zip(("to_q", "to_k", "to_v"), qkv)] + \
               [(f"{blk}.proj_mlp", slice(3 * hidden, None))]
    raise AssertionError(f"no diffusers layout written down for {stem}")


def _lora_state_dict(source):
    """diffusers' reading of a kohya Flux LoRA (a file, or a state dict): (diffusers-keyed state dict, alphas)."""
    from diffusers import FluxPipeline
    if isinstance(source, Path):  # a folder and a weight_name, as users pass it (and as offline mode requires)
        return FluxPipeline.lora_state_dict(str(source.parent), weight_name=source.name, return_alphas=True,
                                            local_files_only=True)
    return FluxPipeline.lora_state_dict(source, return_alphas=True)


def _load_and_check(transformer, state_dict, alphas, modules: dict, hidden: int, dense: list[str]) -> None:
    """load_lora_into_transformer, then: the peft LoRA layers are exactly the split of the file's modules, and each
    one's delta (scaling included) equals its rows of the file's alpha / rank * up @ down: on probe vectors for all
    of them, densely for the modules in ``dense``."""
    from diffusers import FluxPipeline
    from peft.tuners.lora import LoraLayer

    assert alphas is None, "kohya files: diffusers folds alpha / rank into the factors"
    FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=transformer,
                                            adapter_name=ADAPTER)
    layers = {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}
    expected = {name: (stem, rows) for stem in modules for name, rows in _diffusers_split(stem, hidden)}
    assert set(layers) == set(expected), (sorted(set(expected) - set(layers)), sorted(set(layers) - set(expected)))
    probes = torch.randn(hidden * 5, 3, generator=torch.Generator().manual_seed(9))
    for name, (stem, rows) in expected.items():
        down, up, scale = modules[stem]
        layer = layers[name]
        a, b = layer.lora_A[ADAPTER].weight.detach().float(), layer.lora_B[ADAPTER].weight.detach().float()
        s = layer.scaling[ADAPTER]
        v = probes[:down.shape[1]]
        ours = scale * (up[rows] @ (down @ v))  # a sum over up to 15360 inputs: float32 rounding ~1e-5 of its size
        torch.testing.assert_close(s * (b @ (a @ v)), ours, rtol=1e-4, atol=1e-4 * float(ours.abs().max()),
                                   msg=lambda m, n=name: f"{n}: {m}")
        assert b.shape[0] == layer.base_layer.weight.shape[0] and a.shape[1] == layer.base_layer.weight.shape[1], name
    for name in dense:  # in blocks of rows: proj_mlp's delta at Flux-dev width is 12288 x 3072
        stem, rows = expected[name]
        down, up, scale = modules[stem]
        layer = layers[name]
        a, b = layer.lora_A[ADAPTER].weight.detach().float(), layer.lora_B[ADAPTER].weight.detach().float()
        up_rows = up[rows]
        assert b.shape[0] == up_rows.shape[0], name
        for r in range(0, b.shape[0], 1024):
            theirs, ours = layer.scaling[ADAPTER] * (b[r:r + 1024] @ a), scale * (up_rows[r:r + 1024] @ down)
            torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name, r=r: f"{n} (dense, rows {r}+): {m}")


def _is_diffusers_width_assert(exc: AssertionError) -> bool:
    """The AssertionError diffusers raises for a single block's linear1 whose rows are not 3072 * 3 + 12288."""
    last = traceback.extract_tb(exc.__traceback__)[-1]
    return last.name == "_convert_to_ai_toolkit_cat" and "sum(dims)" in (last.line or "")


def test_diffusers_reads_the_trained_tiny_flux_lora(trained, diffusers_warnings):
    """The trained tiny file (hidden 64: 2 heads of 32, in_channels 16 * 2 * 2) through diffusers into a
    FluxTransformer2DModel of the same architecture. diffusers' converter cannot split a linear1 that is not
    Flux-dev-wide (see the module docstring); every other module of the file is loaded and checked at this width,
    and the test then xfails naming that limitation, unless diffusers reads the whole file (then all is checked)."""
    from diffusers import FluxTransformer2DModel

    hidden = 64
    sd = load_file(str(trained.path))
    modules = _file_modules(sd)

    def transformer():
        torch.manual_seed(0)
        return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                      attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                                      pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12))

    try:
        state_dict, alphas = _lora_state_dict(trained.path)
    except AssertionError as e:
        if not _is_diffusers_width_assert(e):
            raise
        linear1 = {s: m for s, m in modules.items() if s.endswith("_linear1")}
        assert [m[1].shape[0] for m in linear1.values()] == [7 * hidden], "only linear1 (3 * 64 + 256 rows) is wider"
        rest = {s: m for s, m in modules.items() if s not in linear1}
        state_dict, alphas = _lora_state_dict({k: v for k, v in sd.items() if k.rsplit(".", 2)[0] not in linear1
                                               and not (k.endswith(".alpha") and k[:-len(".alpha")] in linear1)})
        _load_and_check(transformer(), state_dict, alphas, rest, hidden,
                        dense=["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj"])
        assert not diffusers_warnings, [r.getMessage()[:300] for r in diffusers_warnings]
        pytest.xfail(f"diffusers' kohya Flux converter (_convert_kohya_flux_lora_to_diffusers) hard-codes "
                     f"dims=[3072, 3072, 3072, 12288] for single_blocks linear1: this file's linear1 has "
                     f"{7 * hidden} rows -> bare AssertionError 'assert sum(dims) == up_weight.shape[0]'; the other "
                     f"{len(rest)} modules load and match (linear1 at Flux-dev width: the next test)")
    _load_and_check(transformer(), state_dict, alphas, modules, hidden,
                    dense=["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"])
    assert not diffusers_warnings, [r.getMessage()[:300] for r in diffusers_warnings]


def test_diffusers_reads_a_flux_dev_width_lora_of_the_pack(comfy, tmp_path, diffusers_warnings):
    """A Flux-dev-width LoRA (hidden 3072, 24 heads; 1 double + 1 single block) on every flux_all_linear module of
    ComfyUI's Flux, seeded random factors, written by the pack; diffusers splits each fused module (linear1 included)
    into its layers with the rows and scale of our delta."""
    import comfy.ldm.flux.model
    import comfy.ops
    from diffusers import FluxTransformer2DModel
    from idlora.models.lora import select_targets
    from idlora.training.lora_format import LoraBundle, LoraWeight, save_bundle
    from tiny_checkpoint import TINY_FLUX_CKPT_DIT  # tools/: Flux-dev's widths, 1 + 1 blocks

    hidden = TINY_FLUX_CKPT_DIT["hidden_size"]
    with torch.device("meta"):
        dit = comfy.ldm.flux.model.Flux(device="meta", operations=comfy.ops.disable_weight_init,
                                        **TINY_FLUX_CKPT_DIT)
    g = torch.Generator().manual_seed(3)
    weights = {}
    for p, m in sorted(select_targets(dit, "flux_all_linear").items()):
        out_f, in_f = m.weight.shape
        weights[p] = LoraWeight(torch.randn(RANK, in_f, generator=g) * 0.1, torch.randn(out_f, RANK, generator=g) * 0.1,
                                ALPHA)
    assert weights["single_blocks.0.linear1"].up.shape[0] == 3 * 3072 + 12288
    path = Path(save_bundle(tmp_path / "flux_dev_width.safetensors", LoraBundle(weights, {"idlora_base_model": "flux"}),
                            torch.float32))
    modules = _file_modules(load_file(str(path)))
    assert len(modules) == len(weights) == 10

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=TINY_FLUX_CKPT_DIT["context_in_dim"],
            pooled_projection_dim=TINY_FLUX_CKPT_DIT["vec_in_dim"], guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    transformer.to_empty(device="cpu")  # 0.5 B uninitialised weights: never written, so never really allocated
    state_dict, alphas = _lora_state_dict(path)
    _load_and_check(transformer, state_dict, alphas, modules, hidden,
                    dense=["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"])
    assert not diffusers_warnings, [r.getMessage()[:300] for r in diffusers_warnings]


def test_flux_lora_round_trips_exactly_through_difflora_flat_layout(comfy, tmp_path):
    """DiffLoRA's flat layout (training/lora_vector.py) on a Flux LoRA trained on the tiny Flux-dev: flatten +
    unflatten gives the same tensors bit for bit, the layout survives JSON, and the file saved from the unflattened
    LoRA patches every module in the stock LoraLoader exactly as the original's does."""
    import comfy.lora
    import comfy.utils
    import comfy_tiny
    import folder_paths
    import nodes
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.lora_format import save_lora
    from idlora.training.lora_trainer import LoraTrainConfig, LoraTrainer, TrainData
    from idlora.training.lora_vector import LoraLayout

    patcher = comfy_tiny.tiny_patcher("flux")
    data = TrainData(torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)),
                     comfy_tiny.tiny_flux_cond(1, 0))
    bundle = LoraTrainer(ComfyDiffusion(patcher), data, LoraTrainConfig(steps=2, learning_rate=1e-2, rank=4,
                                                                        targets="flux_all_linear")).run()
    layout = LoraLayout.of(bundle.weights)
    vector = layout.flatten(bundle.weights)
    assert vector.ndim == 1 and vector.numel() == layout.length
    back = LoraLayout.from_json(layout.to_json()).unflatten(vector)
    assert set(back) == set(bundle.weights)
    for n, w in bundle.weights.items():
        assert torch.equal(back[n].down, w.down) and torch.equal(back[n].up, w.up) and back[n].alpha == w.alpha

    folder_paths.add_model_folder_path("loras", str(tmp_path))
    try:
        save_lora(tmp_path / "orig.safetensors", bundle.weights, bundle.metadata, dtype=torch.float32)
        save_lora(tmp_path / "back.safetensors", back, bundle.metadata, dtype=torch.float32)
        (a,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, "orig.safetensors", 1.0)
        (b,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, "back.safetensors", 1.0)
    finally:
        folder_paths.folder_names_and_paths["loras"][0].remove(str(tmp_path))
    assert len(a.patches) == len(bundle.weights) and set(a.patches) == set(b.patches)
    for key in a.patches:
        base = comfy.utils.get_attr(patcher.model, key)
        wa = comfy.lora.calculate_weight(a.patches[key], base.clone().float(), key)
        wb = comfy.lora.calculate_weight(b.patches[key], base.clone().float(), key)
        assert torch.equal(wa, wb) and not torch.equal(wa, base.float()), key


def test_difflora_samples_a_flux_lora_the_stock_loader_applies_to_every_module(comfy, tmp_path):
    """A DiffLoRA (LAE + DiT, seeded random weights) over the rank-1 flux_attn layout of the tiny Flux-dev: its
    samples for two faces are different LoRAs of that layout, saved as kohya Flux files, and the stock LoraLoader
    patches every module of the layout (and nothing else)."""
    import comfy_tiny
    import folder_paths
    import nodes
    from idlora.models.dit import DiTConfig, LoraDiT
    from idlora.models.lae import LaeConfig, LoraAutoencoder
    from idlora.models.lora import select_targets
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.difflora import DiffLora
    from idlora.training.lora_format import save_bundle
    from idlora.training.lora_vector import LayerSpec, LoraLayout

    patcher = comfy_tiny.tiny_patcher("flux")
    diffusion = ComfyDiffusion(patcher)
    targets = select_targets(diffusion.denoiser, "flux_attn")
    layout = LoraLayout([LayerSpec(n, m.weight.shape[0], (1, m.weight.shape[1]), (m.weight.shape[0], 1), 1.0)
                         for n, m in sorted(targets.items())])
    torch.manual_seed(0)
    lae = LoraAutoencoder(LaeConfig(layout.length, patch=16, levels=2, channels=16, latent_channels=4, heads=4,
                                    mlp_hidden=32))
    with torch.no_grad():
        for p in lae.head.parameters():  # the head starts at zero (an untrained LAE returns its mean LoRA)
            p.normal_(0, 0.05)
    c, t = lae.cfg.latent_shape
    dit = LoraDiT(DiTConfig(c, t, face_dim=512, image_dim=32, hidden=32, depth=1, heads=4))
    with torch.no_grad():  # no adaLN-Zero: an untrained DiT would give every face the same LoRA
        for p in dit.parameters():
            p.normal_(0, 0.05)
    model = DiffLora(layout, lae, dit, 1.0, {}, {"base_model": "flux", "targets": "flux_attn"})
    faces = torch.nn.functional.normalize(torch.randn(2, 512, generator=torch.Generator().manual_seed(1)), dim=-1)
    samples = model.sample(faces, torch.randn(2, 32), steps=4, seed=0)
    assert len(samples) == 2 and all(set(s) == set(targets) for s in samples)
    assert any(not torch.equal(samples[0][n].up, samples[1][n].up) for n in targets)  # the face matters

    folder_paths.add_model_folder_path("loras", str(tmp_path))
    try:
        save_bundle(tmp_path / "sampled.safetensors", model.bundle(samples[0], stems=diffusion.lora_stems))
        (stock,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, "sampled.safetensors", 1.0)
    finally:
        folder_paths.folder_names_and_paths["loras"][0].remove(str(tmp_path))
    assert set(stock.patches) == {f"diffusion_model.{n}.weight" for n in targets}
