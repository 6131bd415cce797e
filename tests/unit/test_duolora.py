"""DuoLoRA / ZipLoRA / naive merging on a tiny pure-torch model: mask algebra, exact export, the cycle loss of
identical LoRAs, the layer-prior hinge, unequal ranks and peft files, and clear errors."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from idlora.models.lora import LoraNetwork
from idlora.models.merge import MergeNetwork
from idlora.training.duolora import (CONTENT, STYLE, LoraMerger, MergeConfig, MergeData, check_prompts, combine,
                                     layer_prior_loss, resolve_pair)
from idlora.training.lora_format import LoraBundle, LoraWeight, load_lora, save_lora
from idlora.training.lora_trainer import LoraTrainConfig, LoraTrainer, TrainingInputError, prepare_data
from tiny_torch import TinyDiffusion, images


def trained(model, seed: int, rank: int = 4, targets: str = "attn") -> dict:
    data = prepare_data(model, images(1, seed=seed), f"a photo {seed}")
    bundle = LoraTrainer(model, data, LoraTrainConfig(steps=3, learning_rate=5e-2, rank=rank, seed=seed,
                                                      targets=targets)).run()
    return {n: (w.down, w.up, w.alpha) for n, w in bundle.weights.items()}


def merge_data(model) -> MergeData:
    c = prepare_data(model, images(2, seed=1), "a v1 object in s1 style")
    s = prepare_data(model, images(1, seed=2), "a v2 object in s2 style")
    cs = model.encode_prompts(["a v1 object in s2 style"], 32, 32)
    return MergeData(c.latents, s.latents, {k: v[:1] for k, v in c.cond.items()}, s.cond, cs)


def forward(model, net, x, sigma, cond):
    with torch.no_grad(), net.attached():
        return model.net_forward(x, sigma, cond)


@pytest.fixture(scope="module")
def setup():
    model = TinyDiffusion(seed=0)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    return model, trained(model, 1, rank=4, targets="attn_ff"), trained(model, 2, rank=8, targets="attn"), x


def _modules(model):
    return dict(model.denoiser.named_modules())


def test_ziprank_with_all_masks_one_equals_the_naive_sum_and_the_two_loras(setup):
    model, content, style, x = setup
    sigma, cond = model.sigmas[200].reshape(1), {"context": torch.randn(1, 8, 16)}
    zr, nv = (MergeNetwork(_modules(model), content, style, m) for m in ("ziprank", "naive"))
    both = [LoraNetwork({n: _modules(model)[n] for n in w}, rank=r) for w, r in ((content, 4), (style, 8))]
    for net, w in zip(both, (content, style)):
        for n, layer in net.items():
            layer.set_weights(*w[n])
    with torch.no_grad(), both[0].attached(), both[1].attached():
        reference = model.net_forward(x, sigma, cond)
    a, b = forward(model, zr, x, sigma, cond), forward(model, nv, x, sigma, cond)
    assert (a - model.net_forward(x, sigma, cond)).abs().max() > 1e-3
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, reference, atol=1e-5)


@pytest.mark.parametrize("method", ["ziprank", "ziplora", "naive"])
def test_export_is_exact_and_prunes_zero_rank_components(setup, method):
    model, content, style, x = setup
    sigma, cond = model.sigmas[300].reshape(1), {"context": torch.randn(1, 8, 16)}
    net = MergeNetwork(_modules(model), content, style, method)
    g = torch.Generator().manual_seed(5)
    masks = {}
    for n, layer in net.items():
        mc, ms = torch.rand(layer.m_c.shape, generator=g), torch.rand(layer.m_s.shape, generator=g)
        if method == "ziprank":
            mc[0] = 0.0  # pruned on export
        masks[n] = (mc, ms)
    net.set_masks(masks)
    merged = forward(model, net, x, sigma, cond)
    exported = net.export()
    lora = LoraNetwork({n: _modules(model)[n] for n in exported}, rank=1)
    for n, layer in lora.items():
        d, u, a = exported[n]
        layer.rank = d.shape[0]
        layer.down, layer.up = torch.nn.Parameter(d), torch.nn.Parameter(u)
        layer.alpha = a
    assert torch.allclose(forward(model, lora, x, sigma, cond), merged, atol=1e-5)
    name = next(iter(exported))
    r_c = content[name][0].shape[0] if name in content else 1
    r_s = style[name][0].shape[0] if name in style else 1
    assert exported[name][0].shape[0] == r_c + r_s - (1 if method == "ziprank" else 0)


def test_identical_loras_give_zero_cycle_loss():
    model = TinyDiffusion(seed=0)
    lora = trained(model, 1)
    data = merge_data(model)
    data = MergeData(data.content, data.style, data.cond_c, data.cond_c, data.cond_c)  # one prompt for all
    merger = LoraMerger(model, data, MergeConfig(steps=1, method="duolora"), lora, lora)
    merger.network.set_masks({n: (torch.full_like(l.m_c, 0.5), torch.full_like(l.m_s, 0.5))
                              for n, l in merger.network.items()})  # 0.5 L + 0.5 L = L
    with merger.session():
        merger.sample_batch()
        d = merger.cycle_draw
        cycle = merger.cycle_loss(d, model.prediction_type)
        off = {n: (torch.full_like(l.m_c, 0.9), torch.full_like(l.m_s, 0.9)) for n, l in merger.network.items()}
        merger.network.set_masks(off)
        cycle_off = merger.cycle_loss(d, model.prediction_type)
    assert float(cycle.detach()) < 1e-10 and float(cycle_off.detach()) > 1e-6


def test_layer_prior_pushes_masks_as_the_hinge_says(setup):
    model, content, style, _ = setup
    net = MergeNetwork(_modules(model), content, style, "ziprank")
    names = net.names
    kinds = {names[0]: (CONTENT, (2, 2)), names[1]: (STYLE, (8, 8))}
    c0, c1 = net.layers[names[0].replace(".", "__")], net.layers[names[1].replace(".", "__")]
    with torch.no_grad():
        c0.m_c.fill_(0.1), c0.m_s.fill_(1.0)      # content layer, style mask larger: hinge active
        c1.m_c.fill_(0.1), c1.m_s.fill_(1.0)      # style layer, style mask dominant: hinge inactive
    loss = layer_prior_loss(net, kinds, hinge=2.0)
    loss.backward()
    assert (c0.m_c.grad < 0).all() and (c0.m_s.grad > 0).all()  # grow the content mask, shrink the style one
    assert (c1.m_s.grad > 0).all() and (c1.m_c.grad == 0).all()  # only the L1 pull on the dominant (style) mask
    assert all(p.grad is None or (p.grad == 0).all() for n, l in net.items() if n not in names[:2]
               for p in (l.m_c, l.m_s))


@pytest.mark.parametrize("method", ["duolora", "ziprank", "ziplora", "naive"])
def test_merge_runs_with_unequal_ranks_and_masks_learn(setup, method):
    model, content, style, _ = setup
    merger = LoraMerger(model, merge_data(model), MergeConfig(steps=4, method=method, cycle_every=2), content, style,
                        {n: (CONTENT if i % 2 else STYLE, None) for i, n in enumerate(sorted({**content, **style}))})
    before = {n: (l.m_c.detach().clone(), l.m_s.detach().clone()) for n, l in merger.network.items()}
    bundle = merger.run()
    changed = any(not torch.equal(before[n][0], l.m_c) for n, l in merger.network.items())
    assert changed == (method != "naive")
    assert bundle.metadata["idlora_method"] == f"merge_{method}"
    if method == "duolora":
        assert {"recon", "cycle", "prior"} <= set(merger.parts) or {"recon", "prior"} <= set(merger.parts)


def test_peft_and_kohya_files_merge(tmp_path, setup):
    model, content, style, _ = setup
    shapes = {n: tuple(m.weight.shape) for n, m in _modules(model).items() if hasattr(m, "weight") and m.weight is not None
              and m.weight.ndim >= 2}
    save_file({f"base_model.model.{n}.lora_A.weight": d.contiguous() for n, (d, u, a) in style.items()} |
              {f"base_model.model.{n}.lora_B.weight": u.contiguous() for n, (d, u, a) in style.items()},
              str(tmp_path / "peft.safetensors"))
    save_lora(tmp_path / "kohya.safetensors", {n: LoraWeight(d, u, a) for n, (d, u, a) in content.items()}, {})
    c, s = resolve_pair(load_lora(tmp_path / "kohya.safetensors"), load_lora(tmp_path / "peft.safetensors"), shapes)
    assert set(c) == set(content) and set(s) == set(style)
    assert torch.allclose(s[next(iter(s))][1], style[next(iter(s))][1])


def test_bad_inputs_are_named(setup):
    model, content, style, _ = setup
    shapes = {n: tuple(m.weight.shape) for n, m in _modules(model).items() if hasattr(m, "weight") and m.weight is not None
              and m.weight.ndim >= 2}
    a = LoraBundle({n: LoraWeight(*w) for n, w in content.items()}, {"idlora_base_model": "sd15"}, "module")
    b = LoraBundle({n: LoraWeight(*w) for n, w in style.items()}, {"idlora_base_model": "sdxl"}, "module")
    with pytest.raises(TrainingInputError, match=r"content LoRA is for base model 'sd15' and the style LoRA for 'sdxl'"):
        resolve_pair(a, b, shapes)
    alien = LoraBundle({"lora_unet_nothing_here": LoraWeight(torch.zeros(2, 3), torch.zeros(3, 2), 2.0)}, {}, "kohya")
    with pytest.raises(TrainingInputError, match=r"style LoRA does not fit this model"):
        resolve_pair(a, alien, shapes)
    with pytest.raises(TrainingInputError, match=r"mixed_prompt is empty"):
        check_prompts(content_prompt="a v1", style_prompt="a v2", mixed_prompt=" ")


def test_multi_concept_combine_is_the_average(setup):
    model, content, style, x = setup
    sigma, cond = model.sigmas[200].reshape(1), {"context": torch.randn(1, 8, 16)}
    b1 = LoraBundle({n: LoraWeight(*w) for n, w in content.items()}, {}, "module")
    b2 = LoraBundle({n: LoraWeight(*w) for n, w in style.items()}, {}, "module")
    merged = combine([b1, b2])
    nets = []
    for w, src in ((merged.weights, None), (b1.weights, 0.5), (b2.weights, 0.5)):
        net = LoraNetwork({n: _modules(model)[n] for n in w}, rank=1)
        for n, layer in net.items():
            layer.rank, layer.down, layer.up = w[n].rank, torch.nn.Parameter(w[n].down), torch.nn.Parameter(w[n].up)
            layer.alpha = w[n].alpha * (src or 1.0)
        nets.append(net)
    with torch.no_grad(), nets[1].attached():
        both_halves = forward(model, nets[2], x, sigma, cond)
    assert torch.allclose(forward(model, nets[0], x, sigma, cond), both_halves, atol=1e-5)
    assert not torch.allclose(both_halves, model.net_forward(x, sigma, cond), atol=1e-4)


def test_block_patterns_are_checked_when_configured():
    from idlora.training.duolora import CONTENT, OTHER, STYLE, MergeConfig, classify_by_name
    from idlora.training.lora_trainer import TrainingInputError

    with pytest.raises(TrainingInputError, match="give both content_blocks and style_blocks"):
        MergeConfig(content_blocks="^a").validate()
    with pytest.raises(TrainingInputError, match="style_blocks"):
        MergeConfig(content_blocks="^a", style_blocks="(").validate()
    kinds = classify_by_name(["double_blocks.0.x", "single_blocks.1.y", "final_layer.z"], "^double", "^single")
    assert kinds == {"double_blocks.0.x": (CONTENT, None), "single_blocks.1.y": (STYLE, None),
                     "final_layer.z": (OTHER, None)}
    with pytest.raises(TrainingInputError, match="matches both"):
        classify_by_name(["blocks.0"], "blocks", r"\.0")


def test_weight_share_rule_pins_each_layer_to_the_lora_that_changes_it_more():
    """classify_by_weights: ||scale * up @ down||_F without the product; each LoRA's norm shares over the layers; a
    layer is content where the content share >= the style share; a layer one LoRA lacks belongs to the other."""
    from idlora.training.duolora import CONTENT, STYLE, classify_by_weights, lora_norm

    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g)
    assert lora_norm((down, up, 2.0)) == pytest.approx(float((up @ down).norm()) * 2.0 / 4, rel=1e-5)
    conv_down, conv_up = torch.randn(4, 3, 3, 3, generator=g), torch.randn(5, 4, 1, 1, generator=g)
    dense = conv_up.reshape(5, 4) @ conv_down.reshape(4, -1)
    assert lora_norm((conv_down, conv_up, None)) == pytest.approx(float(dense.norm()), rel=1e-5)
    assert lora_norm(None) == 0.0

    def lora(scales):
        return {n: (torch.randn(4, 12, generator=g) * s, torch.randn(10, 4, generator=g), None)
                for n, s in scales.items()}
    names = ["double_blocks.0.a", "double_blocks.1.a", "single_blocks.0.a", "single_blocks.1.a"]
    content = lora({"double_blocks.0.a": 3.0, "double_blocks.1.a": 3.0, "single_blocks.0.a": 0.3,
                    "single_blocks.1.a": 0.3})
    # the style LoRA is ten times larger everywhere: shares, not absolute norms, decide
    style = lora({"double_blocks.0.a": 3.0, "double_blocks.1.a": 3.0, "single_blocks.0.a": 30.0,
                  "single_blocks.1.a": 30.0})
    kinds = classify_by_weights(names, content, style)
    assert kinds == {n: (CONTENT if n.startswith("double") else STYLE, None) for n in names}
    del content["single_blocks.1.a"], style["double_blocks.0.a"]
    kinds = classify_by_weights(names, content, style)
    assert kinds["single_blocks.1.a"] == (STYLE, None) and kinds["double_blocks.0.a"] == (CONTENT, None)


# -- the paper's readings as options ---------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("loss_weighting", "both", "loss_weighting = 'both' is invalid: use one of"),
    ("prior_normalization", "max", "prior_normalization = 'max' is invalid"),
    ("recon_loss", "l1", "recon_loss = 'l1' is invalid"),
    ("draws", "some", "draws = 'some' is invalid"),
    ("cycle_translate_grad", "yes", "cycle_translate_grad = 'yes' is invalid: use true or false"),
    ("translate_steps", 0, "translate_steps = 0 is invalid: use a whole number from 1"),
    ("translate_steps", 2.5, "translate_steps = 2.5 is invalid"),
])
def test_new_options_are_validated_with_clear_errors(field, value, message):
    with pytest.raises(TrainingInputError, match=message):
        MergeConfig(**{field: value}).validate()


def test_equation_weighting_needs_a_positive_lambda_cycle():
    with pytest.raises(TrainingInputError, match="lambda_cycle = 0.0 is invalid: .*weighs the reconstruction too"):
        MergeConfig(loss_weighting="equation", lambda_cycle=0.0).validate()
    MergeConfig(loss_weighting="text", lambda_cycle=0.0).validate()
    MergeConfig(method="ziprank", loss_weighting="equation", lambda_cycle=0.0).validate()


def test_configs_saved_before_the_options_resume_with_the_old_readings():
    from dataclasses import asdict

    from idlora.training.duolora import LEGACY_READINGS

    old = {k: v for k, v in asdict(MergeConfig(steps=7)).items() if k not in LEGACY_READINGS}
    cfg = MergeConfig.from_saved(old)
    assert cfg.steps == 7 and all(getattr(cfg, k) == v for k, v in LEGACY_READINGS.items())
    new = asdict(MergeConfig(steps=7, draws="cached"))
    assert MergeConfig.from_saved(new) == MergeConfig(steps=7, draws="cached")  # a new config keeps its own
    with pytest.raises(TrainingInputError, match="unknown training settings"):
        MergeConfig.from_saved({**old, "lambda_nothing": 1.0})


def test_mean_prior_does_not_grow_with_the_number_of_mask_entries(setup):
    model, content, style, _ = setup
    net = MergeNetwork(_modules(model), content, style, "ziprank")
    names = net.names
    for n_layers in (2, len(names)):
        kinds = {n: (CONTENT if i % 2 else STYLE, None) for i, n in enumerate(names[:n_layers])}
        with torch.no_grad():
            for _, layer in net.items():
                layer.m_c.fill_(0.5), layer.m_s.fill_(0.25)
        mean = layer_prior_loss(net, kinds, hinge=1.0, normalization="mean").detach()
        total = layer_prior_loss(net, kinds, hinge=1.0, normalization="sum").detach()
        # every layer: the dominant mask's share (0.5 or 0.25 of the longer mask) + the hinge where the other is larger
        expect = []
        for n, (k, _) in kinds.items():
            layer = net.layers[n.replace(".", "__")]
            dom, oth = (layer.m_c, layer.m_s) if k == CONTENT else (layer.m_s, layer.m_c)
            term = float((dom.sum() + torch.relu(oth.sum() - dom.sum())).detach())
            expect.append((term, term / max(dom.numel(), oth.numel())))
        assert float(total) == pytest.approx(sum(t for t, _ in expect), rel=1e-6)
        assert float(mean) == pytest.approx(sum(m for _, m in expect) / len(expect), rel=1e-6)
        assert float(mean) <= 1.0 + 1e-6 < float(total)


@pytest.mark.parametrize("weighting", ["equation", "text"])
def test_the_loss_is_weighted_as_the_reading_says(setup, weighting):
    model, content, style, _ = setup
    cfg = MergeConfig(steps=1, method="duolora", loss_weighting=weighting, lambda_cycle=0.3, lambda_layer_prior=0.7)
    kinds = {n: (CONTENT if i % 2 else STYLE, None) for i, n in enumerate(sorted({**content, **style}))}
    merger = LoraMerger(model, merge_data(model), cfg, content, style, kinds)
    merger.run()
    p, value = merger.parts, merger.losses[-1]
    expect = (0.7 * p["prior"] + 0.3 * (p["recon"] + p["cycle"]) if weighting == "equation" else
              p["recon"] + 0.3 * p["cycle"] + 0.7 * p["prior"])
    assert value == pytest.approx(expect, rel=1e-5)


def test_norm_reconstruction_is_the_l2_norm_per_sample(setup):
    model, content, style, _ = setup
    merger = LoraMerger(model, merge_data(model), MergeConfig(steps=1, recon_loss="norm"), content, style, {})
    a, b = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    assert float(merger.recon(a, b)) == pytest.approx(float((a - b).flatten(1).norm(dim=1).mean()), rel=1e-6)
    zr = LoraMerger(model, merge_data(model), MergeConfig(method="ziprank", steps=1, recon_loss="norm"), content,
                    style)
    assert float(zr.recon(a, b)) == pytest.approx(float(torch.nn.functional.mse_loss(a, b)), rel=1e-6)  # DuoLoRA's only


def test_fresh_draws_change_every_step_and_cached_draws_repeat(setup):
    model, content, style, _ = setup
    seen = {}
    for mode in ("fresh", "cached"):
        merger = LoraMerger(model, merge_data(model), MergeConfig(method="ziprank", steps=4, draws=mode,
                                                                  cached_draws=2), content, style)
        noises = []
        with merger.session():
            for _ in range(4):
                merger.train_step()
                noises.append(merger.draw["nc"].clone())
        seen[mode] = noises
        assert (merger.draws is None) == (mode == "fresh")
    assert all(not torch.equal(a, b) for i, a in enumerate(seen["fresh"]) for b in seen["fresh"][i + 1:])
    assert torch.equal(seen["cached"][0], seen["cached"][2]) and not torch.equal(seen["cached"][0], seen["cached"][1])


@pytest.mark.parametrize("steps,grad", [(1, False), (3, False), (3, True)])
def test_identical_loras_give_zero_cycle_loss_for_every_translation(steps, grad):
    model = TinyDiffusion(seed=0)
    lora = trained(model, 1)
    data = merge_data(model)
    data = MergeData(data.content, data.style, data.cond_c, data.cond_c, data.cond_c)
    merger = LoraMerger(model, data, MergeConfig(steps=1, translate_steps=steps, cycle_translate_grad=grad), lora,
                        lora)
    merger.network.set_masks({n: (torch.full_like(l.m_c, 0.5), torch.full_like(l.m_s, 0.5))
                              for n, l in merger.network.items()})
    with merger.session():
        merger.sample_batch()
        d = merger.cycle_draw
        sigmas = merger.sigma_path(d["sc"])
        assert len(sigmas) == steps - 1 and all(float(b) < float(a) for a, b in zip([d["sc"], *sigmas], sigmas))
        assert float(merger.cycle_loss(d, model.prediction_type).detach()) < 1e-10


def test_cycle_translate_grad_sends_gradient_through_the_translating_pass(setup):
    model, content, style, _ = setup
    grads = {}
    for grad in (False, True):
        merger = LoraMerger(model, merge_data(model), MergeConfig(steps=1, cycle_translate_grad=grad), content,
                            style, {})
        with merger.session():
            merger.sample_batch()
            merger.cycle_loss(merger.cycle_draw, model.prediction_type).backward()
        grads[grad] = torch.cat([p.grad.flatten() for p in merger.network.mask_parameters()])
    assert grads[False].abs().sum() > 0 and (grads[True] - grads[False]).abs().max() > 1e-6
