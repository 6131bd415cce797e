"""In-process ComfyUI: IDLoRA Content/Style Guidance (ConsisLoRA inference guidance) on a tiny SD1.5 U-Net.

The guider's prediction is checked against the formula computed from separately LoRA-patched models
run through ComfyUI's stock CFGGuider, and its sampling against the stock guider when both lambdas are 0.
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import pytest
import torch

pytestmark = pytest.mark.comfy

CONTENT_MODULES = (r"(input_blocks\.\d\.1\.transformer_blocks\.0\.attn[12]\.to_[qk]"
                   r"|input_blocks\.0\.0|input_blocks\.1\.1\.proj_in)$")
STYLE_MODULES = r"(attn2\.to_[kv]|attn1\.to_out\.0|output_blocks\.\d\.0\.out_layers\.3)$"
OTHER_MODULES = r"(attn1\.to_v|ff\.net\.2)$"
FLUX_MODULES = {  # the same roles on the tiny Flux DiT (a flow-matching model: ComfyUI's CONST denoised)
    CONTENT_MODULES: r"double_blocks\.0\.(img_attn\.qkv|img_mlp\.0)$",
    STYLE_MODULES: r"(single_blocks\.0\.linear[12]|double_blocks\.0\.txt_attn\.proj)$",
    OTHER_MODULES + "|" + CONTENT_MODULES: r"double_blocks\.0\.(img_attn\.(qkv|proj)|img_mlp\.[02])$",
}
S_C, S_S = 0.8, 0.6
CFG = 5.0


@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    import folder_paths
    loras = tmp_path_factory.mktemp("guidance_loras")
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    return loras


def _model(arch: str = "sd15"):
    import comfy_tiny
    return comfy_tiny.tiny_patcher(arch)


def _bundle(patcher, pattern: str, seed: int, rank: int = 3, alpha: float | None = 2.0):
    """Random LoRA on the modules matching ``pattern``; down and up both non-zero. 1x1 convs get Linear-shaped
    (2-D) factors, as diffusers LoRAs of proj_in have, so the reshaping path is used too."""
    from idlora.training.lora_format import LoraBundle, LoraWeight
    sd = patcher.model.diffusion_model.state_dict()
    if "double_blocks.0.img_attn.qkv.weight" in sd:
        pattern = FLUX_MODULES[pattern]
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for key in sorted(k for k, v in sd.items() if k.endswith(".weight") and v.ndim >= 2):
        path, w = key[:-len(".weight")], sd[key]
        if not re.search(pattern, path):
            continue
        flat = w.ndim == 2 or tuple(w.shape[2:]) == (1, 1)
        down_shape = (rank, w.shape[1]) if flat else (rank, *w.shape[1:])
        up_shape = (w.shape[0], rank) if flat else (w.shape[0], rank, 1, 1)
        weights[path] = LoraWeight(torch.randn(down_shape, generator=g) * 0.3,
                                   torch.randn(up_shape, generator=g) * 0.3, alpha)
    assert weights, pattern
    return LoraBundle(weights, {"idlora_base_model": "sd15"})


def _save(env, name: str, bundle) -> str:
    from idlora.training.lora_format import save_lora
    save_lora(env / name, bundle.weights, bundle.metadata, dtype=torch.float32)
    return name


def _cond(seed: int, arch: str = "sd15"):
    g = torch.Generator().manual_seed(seed)
    if arch == "flux":
        return [[torch.randn(1, 8, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    context = torch.randn(1, 77, 64, generator=g)
    return [[context, {"pooled_output": torch.randn(1, 64, generator=g)} if arch == "sdxl" else {}]]


def _patched(model, *loras):
    """``model`` with each (bundle, strength) applied by ComfyUI's weight patching (the reference)."""
    from idlora.nodes.comfy_adapter import apply_lora
    for bundle, strength in loras:
        model = apply_lora(model, bundle, strength)[0]
    return model


def _cfg_guider(model, positive, negative=None, cfg=CFG):
    """The stock guider; without a negative it is ComfyUI's Guider_Basic (the conditional prediction alone)."""
    import comfy.samplers
    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds({"positive": positive, **({"negative": negative} if negative is not None else {})})
    guider.set_cfg(cfg if negative is not None else 1.0)
    return guider


def _first_prediction(guider, sigma: float = 3.0) -> torch.Tensor:
    """The denoised prediction the sampler gets from the guider for a fixed noisy latent at ``sigma`` (a flow
    model's sigma is at most 1: there it is sigma / 4)."""
    import comfy.samplers
    seen = []

    def one_call(model, x, sigmas, extra_args=None, callback=None, disable=None):
        seen.append(model(x, sigmas[0] * x.new_ones([x.shape[0]]), **extra_args))
        return seen[-1]
    base = guider.model_patcher.model
    shape = (1, base.latent_format.latent_channels, 8, 8)
    sigma = sigma / 4 if float(base.model_sampling.sigma_max) <= 1 else sigma
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    guider.sample(noise, torch.zeros(shape), comfy.samplers.KSAMPLER(one_call), torch.tensor([sigma, 0.0]),
                  disable_pbar=True, seed=0)
    return seen[0]


def _euler(guider, steps: int = 3) -> torch.Tensor:
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.model.model_sampling, "normal", steps)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    return guider.sample(noise, torch.zeros(1, 4, 8, 8), comfy.samplers.sampler_object("euler"), sigmas,
                         disable_pbar=True, seed=0)


@contextmanager
def _counting(patcher, fail_at: int | None = None):
    """Counts diffusion-model forward calls (U-Net evaluations); optionally raises at call number ``fail_at``."""
    calls = [0]

    def pre_hook(module, args):
        calls[0] += 1
        if calls[0] == fail_at:
            raise RuntimeError("stop here")
    handle = patcher.model.diffusion_model.register_forward_pre_hook(pre_hook)
    try:
        yield calls
    finally:
        handle.remove()


def _no_hooks_left(patcher) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in patcher.model.diffusion_model.modules())


def _node(model, positive, negative, content_guidance=0.0, style_guidance=0.0, **kw):
    from idlora.nodes.guidance_nodes import ContentStyleGuidance
    return ContentStyleGuidance.execute(model, positive, negative, CFG, S_C, S_S, content_guidance, style_guidance,
                                        **kw).args[0]


def test_schema_is_valid(env):
    from idlora.nodes import guidance_nodes
    schema = guidance_nodes.ContentStyleGuidance.GET_SCHEMA()
    assert schema.node_id == "IDLoRAContentStyleGuidance" and schema.category == "IDLoRA/stylize"
    assert all(i.tooltip for i in schema.inputs)
    assert [o.io_type for o in schema.outputs] == ["GUIDER"]
    assert guidance_nodes.NODES == [guidance_nodes.ContentStyleGuidance]
    v1 = guidance_nodes.ContentStyleGuidance.INPUT_TYPES()  # what the server sends to the frontend
    assert set(v1["required"]) == {"model", "positive", "negative", "cfg", "content_strength", "style_strength",
                                   "content_guidance", "style_guidance"}
    assert v1["optional"]["content_lora_name"][1]["options"][0] == "none" and "style_negative" in v1["optional"]


def test_zero_guidance_samples_like_stock_cfg_on_the_patched_model(env):
    """(a) lambda_c = lambda_s = 0: the same samples as the stock CFGGuider with both LoRAs, and 1 U-Net call a step."""
    base = _model()
    content, style = _bundle(base, CONTENT_MODULES, 1), _bundle(base, STYLE_MODULES, 2)
    positive, negative = _cond(1), _cond(2)
    guider = _node(base, positive, negative, content_lora_name=_save(env, "content_a.safetensors", content),
                   style_lora=style)
    with _counting(base) as calls:
        ours = _euler(guider, steps=3)
    assert calls[0] == 3
    stock = _euler(_cfg_guider(_patched(base, (content, S_C), (style, S_S)), positive, negative), steps=3)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    plain = _euler(_cfg_guider(base, positive, negative), steps=3)
    assert (ours - plain).abs().max() > 1e-2, "the LoRAs should change the samples"


CASES = {  # name: (arch, lambda_c, lambda_s, content given, style given, explicit branch conds + negative LoRAs)
    "both_explicit": ("sd15", 2.0, 1.5, True, True, True),
    "both_defaults": ("sd15", 2.0, 1.5, True, True, False),
    "style_only_term": ("sd15", 0.0, 1.5, True, True, False),
    "style_lora_only": ("sd15", 0.0, -1.0, False, True, True),
    "sdxl_explicit": ("sdxl", 1.0, 2.5, True, True, True),
    "flux_explicit": ("flux", 1.5, 2.0, True, True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prediction_matches_formula_from_separately_patched_models(env, case):
    """(b) One prediction = CFG(main) + sum lambda * (D[LoRA alone @1; pos] - D[base or negative LoRA; neg]),
    each D from its own ComfyUI-patched model; 1 + 2 U-Net calls per nonzero lambda."""
    arch, lam_c, lam_s, has_content, has_style, explicit = CASES[case]
    base = _model(arch)
    lora = {"content": _bundle(base, CONTENT_MODULES, 1), "style": _bundle(base, STYLE_MODULES, 2)}
    neg_lora = {"content": _bundle(base, OTHER_MODULES + "|" + CONTENT_MODULES, 3),
                "style": _bundle(base, STYLE_MODULES, 4, alpha=None)}
    positive, negative = _cond(1, arch), _cond(2, arch)
    conds = {f"{r}_{k}": _cond(10 + i, arch) for i, (r, k) in enumerate(
        (r, k) for r in ("content", "style") for k in ("positive", "negative"))}
    kw = {}
    if has_content:
        kw["content_lora_name"] = _save(env, f"content_{case}.safetensors", lora["content"])
    if has_style:
        kw["style_lora"] = lora["style"]
    if explicit:
        kw.update(conds)
        kw.update({f"{r}_negative_lora": _save(env, f"neg_{r}_{case}.safetensors", neg_lora[r]) for r in lora})
    guider = _node(base, positive, negative, lam_c, lam_s, **kw)
    with _counting(base) as calls:
        ours = _first_prediction(guider)
    assert calls[0] == 1 + 2 * ((lam_c != 0) + (lam_s != 0))

    strengths = {"content": S_C, "style": S_S}
    main = [(lora[r], strengths[r]) for r, given in (("content", has_content), ("style", has_style)) if given]
    expected = _first_prediction(_cfg_guider(_patched(base, *main), positive, negative))
    assert (ours - expected).abs().max() > 1e-2, "guidance > 0 should change the prediction"
    for role, lam in (("content", lam_c), ("style", lam_s)):
        if lam == 0:
            continue
        pos_cond = conds[f"{role}_positive"] if explicit else positive
        neg_cond = conds[f"{role}_negative"] if explicit else positive
        d_pos = _first_prediction(_cfg_guider(_patched(base, (lora[role], 1.0)), pos_cond))
        d_neg = _first_prediction(_cfg_guider(_patched(base, *([(neg_lora[role], 1.0)] if explicit else [])),
                                              neg_cond))
        assert (d_pos - _first_prediction(_cfg_guider(base, pos_cond))).abs().max() > 1e-2, "LoRA has no effect"
        expected = expected + lam * (d_pos - d_neg)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_input_model_untouched_and_no_hooks_left(env):
    """(c) The input MODEL's patches stay as they were; no forward hooks remain, also after a failure mid-step."""
    from idlora.nodes.comfy_adapter import apply_lora
    import comfy_tiny
    tiny = _model()
    base = apply_lora(tiny, _bundle(tiny, OTHER_MODULES, 5), 0.5)[0]  # an input MODEL with patches of its own
    before = ({k: [id(p) for p in v] for k, v in base.patches.items()}, base.patches_uuid)
    x, sigma, ctx = torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 77, 64)
    out_before = comfy_tiny.diffusion_forward(base, x, sigma, ctx)
    guider = _node(base, _cond(1), _cond(2), 2.0, 1.0, content_lora=_bundle(tiny, CONTENT_MODULES, 1),
                   style_lora=_bundle(tiny, STYLE_MODULES, 2))
    first = _euler(guider, steps=2)
    with torch.inference_mode():  # as ComfyUI runs prompts; the guider is reused as a cached node output
        torch.testing.assert_close(_euler(guider, steps=2), first)
    assert ({k: [id(p) for p in v] for k, v in base.patches.items()}, base.patches_uuid) == before
    assert _no_hooks_left(base)
    torch.testing.assert_close(comfy_tiny.diffusion_forward(base, x, sigma, ctx), out_before)

    for fail_at in (2, 5):  # inside the content branch's first call, inside the style branch's second call
        with _counting(base, fail_at=fail_at), pytest.raises(RuntimeError, match="stop here"):
            _euler(guider, steps=2)
        assert _no_hooks_left(base)
    assert guider.deltas.layers == {}, "the branch LoRA layers are dropped after sampling"


def test_neither_lora_names_what_to_connect(env):
    """(d) No content and no style LoRA."""
    with pytest.raises(ValueError, match=r"no LoRA given: connect a LoRA handle to 'content_lora' or 'style_lora'"):
        _node(_model(), _cond(1), _cond(2), 1.0, 1.0)


def test_guidance_without_its_lora_is_refused(env):
    base = _model()
    with pytest.raises(ValueError, match=r"content_guidance is 2.0 but no content LoRA is given.*set "
                                         r"content_guidance to 0"):
        _node(base, _cond(1), _cond(2), 2.0, 0.0, style_lora=_bundle(base, STYLE_MODULES, 2))


def _wrong_shapes(bundle):
    from idlora.training.lora_format import LoraBundle, LoraWeight
    return LoraBundle({p: LoraWeight(torch.cat([w.down, w.down], 1), torch.cat([w.up, w.up], 0), w.alpha)
                       for p, w in bundle.weights.items()}, {"idlora_base_model": "sdxl"})


def test_lora_of_other_model_gives_format_error(env):
    """(d) A LoRA whose shapes do not fit: check_report's LoraFormatError, naming which input it was."""
    from idlora.training.lora_format import LoraFormatError
    base = _model()
    bad = _wrong_shapes(_bundle(base, CONTENT_MODULES, 1))
    with pytest.raises(LoraFormatError, match=r"^content LoRA: this LoRA does not fit the model: 0 of \d+ LoRA "
                                              r"modules match.*sdxl.*use a LoRA made for this checkpoint"):
        _node(base, _cond(1), _cond(2), content_lora=bad)
    name = _save(env, "neg_wrong.safetensors", _wrong_shapes(_bundle(base, STYLE_MODULES, 2)))
    with pytest.raises(LoraFormatError, match=r"^style_negative_lora: this LoRA does not fit the model"):
        _node(base, _cond(1), _cond(2), 0.0, 1.0, style_lora=_bundle(base, STYLE_MODULES, 2),
              style_negative_lora=name)
    _node(base, _cond(1), _cond(2), 0.0, 0.0, style_lora=_bundle(base, STYLE_MODULES, 2),
          style_negative_lora=name)  # unused when its guidance is 0: not even loaded
