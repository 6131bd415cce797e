"""Unit tests for training/lora_format.py (pure torch + safetensors)."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from idlora.training import lora_format
from idlora.training.fileio import atomic_path, atomic_write_bytes
from idlora.training.lora_format import (
    LoraBundle, LoraFormatError, LoraWeight, MatchReport, kohya_stem, load_lora, resolve, sanitize_save_name,
    save_lora,
)

Q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
OUT0 = "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0"
CONV = "input_blocks.1.0.in_layers.2"


def _linear(rank=4, n_in=16, n_out=8, alpha=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return LoraWeight(torch.randn(rank, n_in, generator=gen),
                      torch.randn(n_out, rank, generator=gen), alpha)


def _conv(rank=2, n_in=3, n_out=6, alpha=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return LoraWeight(torch.randn(rank, n_in, 3, 3, generator=gen),
                      torch.randn(n_out, rank, 1, 1, generator=gen), alpha)


def _module_shapes():
    return {Q: (8, 16), OUT0: (8, 16), CONV: (6, 3, 3, 3), "middle_block.1.proj_in": (8, 16)}


def _write(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _pair(stem, down_sfx, up_sfx, weight, alpha=None):
    out = {f"{stem}{down_sfx}": weight.down, f"{stem}{up_sfx}": weight.up}
    if alpha is not None:
        out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return out


# ---------------------------------------------------------------- LoraWeight

def test_delta_linear_equals_scaled_product():
    w = _linear(rank=4, alpha=2.0)
    assert w.rank == 4 and w.scale == 0.5
    torch.testing.assert_close(w.delta(), 0.5 * w.up @ w.down)
    assert w.delta().shape == (8, 16) and w.delta().dtype == torch.float32


def test_delta_conv_shape_and_values():
    w = _conv(rank=2, n_in=3, n_out=6)
    assert w.delta_shape == (6, 3, 3, 3)
    delta = w.delta()
    assert delta.shape == (6, 3, 3, 3)
    expected = (w.up.reshape(6, 2) @ w.down.reshape(2, -1)).reshape(6, 3, 3, 3)
    torch.testing.assert_close(delta, expected)
    assert w.delta((6, 27)).shape == (6, 27)
    with pytest.raises(LoraFormatError, match=r"\(5, 5\)"):
        w.delta((5, 5))


def test_alpha_none_means_scale_one():
    assert _linear(rank=8).scale == 1.0
    assert _linear(rank=8, alpha=4).scale == 0.5


def test_loraweight_rank_mismatch_names_both_shapes():
    with pytest.raises(LoraFormatError) as info:
        LoraWeight(torch.zeros(4, 16), torch.zeros(8, 3))
    assert "(4, 16)" in str(info.value) and "(8, 3)" in str(info.value)


def test_loraweight_rejects_rank_zero():
    with pytest.raises(LoraFormatError, match="rank"):
        LoraWeight(torch.zeros(0, 16), torch.zeros(8, 0))


# ---------------------------------------------------------------- save / load

def test_round_trip_linear_conv_mixed_ranks(tmp_path):
    weights = {Q: _linear(rank=4), CONV: _conv(rank=2, alpha=4.0)}
    path = tmp_path / "sub" / "lora.safetensors"
    save_lora(path, weights, dtype=None)
    bundle = load_lora(path)
    assert bundle.key_style == "kohya"
    assert set(bundle.weights) == {kohya_stem(Q), kohya_stem(CONV)}
    assert bundle.ranks == {4, 2}
    assert bundle.num_params == sum(w.down.numel() + w.up.numel() for w in weights.values())
    for module, original in weights.items():
        loaded = bundle.weights[kohya_stem(module)]
        torch.testing.assert_close(loaded.down, original.down, rtol=0, atol=0)
        torch.testing.assert_close(loaded.up, original.up, rtol=0, atol=0)
        assert loaded.scale == pytest.approx(original.scale)
        torch.testing.assert_close(loaded.delta(), original.delta())
    assert bundle.weights[kohya_stem(Q)].alpha == 4.0  # None saved as rank
    assert bundle.weights[kohya_stem(CONV)].scale == 2.0
    assert bundle.metadata["ss_network_dim"] == "mixed"


def test_saved_key_names_alpha_and_fp16(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_lora(path, {Q: _linear(rank=4, alpha=None)})
    stem = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    assert kohya_stem(Q) == stem
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight",
                                      f"{stem}.alpha"}
        assert handle.get_tensor(f"{stem}.lora_down.weight").dtype == torch.float16
        assert handle.get_tensor(f"{stem}.lora_up.weight").dtype == torch.float16
        alpha = handle.get_tensor(f"{stem}.alpha")
        assert alpha.ndim == 0 and alpha.item() == 4.0
    assert load_lora(path).weights[stem].down.dtype == torch.float32


def test_metadata_round_trip(tmp_path):
    path = tmp_path / "lora.safetensors"
    extra = {"idlora_base_model": "sdxl", "idlora_config": {"steps": 300, "lr": 1e-4}, "n": 3}
    save_lora(path, {Q: _linear(rank=4, alpha=4)}, metadata=extra)
    meta = load_lora(path).metadata
    assert meta["idlora_base_model"] == "sdxl"
    assert json.loads(meta["idlora_config"]) == {"steps": 300, "lr": 1e-4}
    assert meta["n"] == "3"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"
    assert meta["idlora_format_version"] == "1"


def test_caller_metadata_overrides_defaults(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_lora(path, {Q: _linear()}, metadata={"ss_network_module": "custom"})
    assert load_lora(path).metadata["ss_network_module"] == "custom"


def test_save_rejects_colliding_stems(tmp_path):
    with pytest.raises(LoraFormatError, match="a_b.c"):
        save_lora(tmp_path / "x.safetensors", {"a.b_c": _linear(), "a_b.c": _linear()})


DIFF_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
DIFF_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


def _file_stems(path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        return {k[: -len(".alpha")] for k in handle.keys() if k.endswith(".alpha")}


def test_save_writes_the_stems_map_and_sgm_stems_elsewhere(tmp_path):
    """``stems`` (a base model's kohya stems, e.g. diffusers names on SD1.x) name the modules they cover; keys that
    already are kohya stems stay (or move to the map's stem of their module), anything else gets its SGM stem."""
    stems = {Q: DIFF_Q, CONV: DIFF_CONV}
    weights = {f"diffusion_model.{Q}.weight": _linear(), kohya_stem(CONV): _conv(seed=2),  # an old SGM stem
               OUT0: _linear(seed=3), "lora_unet_up_blocks_1_attentions_0_proj_in": _linear(seed=4)}
    path = save_lora(tmp_path / "x.safetensors", weights, dtype=None, stems=stems)
    assert _file_stems(path) == {DIFF_Q, DIFF_CONV, kohya_stem(OUT0), "lora_unet_up_blocks_1_attentions_0_proj_in"}
    bundle = load_lora(path)
    torch.testing.assert_close(bundle.weights[DIFF_CONV].delta(), weights[kohya_stem(CONV)].delta())
    with pytest.raises(LoraFormatError, match="both map to kohya key"):
        save_lora(tmp_path / "y.safetensors", {Q: _linear(), DIFF_Q: _linear()}, stems=stems)


def test_bundles_carry_stems_and_files_with_them_resolve_through_the_inverse_map(tmp_path):
    assert LoraBundle({Q: _linear()}).stems == {}
    path = save_lora(tmp_path / "x.safetensors", {Q: _linear(), CONV: _conv()}, stems={Q: DIFF_Q, CONV: DIFF_CONV})
    bundle = load_lora(path)
    _, plain = resolve(bundle, _module_shapes())
    assert plain.matched == 0, "diffusers stems need the model's map"
    resolved, report = resolve(bundle, _module_shapes(), {DIFF_Q: Q, DIFF_CONV: CONV})
    assert report.ok and set(resolved) == {Q, CONV}


ADAPTER = "lora_adapter_metadata"


def _peft_file(tmp_path, stems: dict[str, LoraWeight], header: dict | None, alpha_keys=()) -> str:
    tensors = {}
    for stem, w in stems.items():
        tensors.update(_pair(stem, ".lora_A.weight", ".lora_B.weight", w, alpha=8 if stem in alpha_keys else None))
    meta = {"format": "pt"} if header is None else {"format": "pt", ADAPTER: json.dumps(header)}
    return _write(tmp_path / "peft.safetensors", tensors, meta)


def test_load_reads_diffusers_adapter_metadata_alpha(tmp_path):
    """diffusers keeps alpha in a lora_adapter_metadata header ('unet.lora_alpha', 'unet.r', patterns); a LoRA
    with lora_alpha 8, r 4 is meant at scale 2, not 1. alpha_pattern / rank_pattern match the module name's end."""
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    stems = {f"{base}.attn1.to_q": _linear(rank=4), f"{base}.attn1.to_v": _linear(rank=4),
             f"{base}.attn2.to_k": _linear(rank=2), f"{base}.attn1.to_out.0": _linear(rank=4)}
    header = {"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": False, "unet.peft_type": "LORA",
              "unet.alpha_pattern": {"attn1.to_v": 2}, "unet.rank_pattern": {"attn2.to_k": 2},
              "text_encoder.r": 16, "text_encoder.lora_alpha": 1}
    bundle = load_lora(_peft_file(tmp_path, stems, header))
    scales = {k.split("transformer_blocks.0.")[1]: w.scale for k, w in bundle.weights.items()}
    assert scales == {"attn1.to_q": 2.0, "attn1.to_v": 0.5, "attn2.to_k": 4.0, "attn1.to_out.0": 2.0}
    torch.testing.assert_close(bundle.weights[f"{base}.attn1.to_q"].delta(), 2.0 * stems[f"{base}.attn1.to_q"].delta())


def test_adapter_metadata_unprefixed_rslora_and_explicit_alpha(tmp_path):
    """A model's own save_lora_adapter writes the LoraConfig unprefixed; use_rslora scales by alpha / sqrt(r);
    an '.alpha' key in the file wins; no header or a header without lora_alpha keeps scale 1."""
    stems = {"down_blocks.0.attentions.0.proj_in": _linear(rank=4), "mid_block.attentions.0.proj_out": _linear(rank=4)}
    bundle = load_lora(_peft_file(tmp_path, stems, {"r": 4, "lora_alpha": 8, "use_rslora": True},
                                  alpha_keys={"mid_block.attentions.0.proj_out"}))
    assert bundle.weights["down_blocks.0.attentions.0.proj_in"].scale == pytest.approx(8 / 2)
    assert bundle.weights["mid_block.attentions.0.proj_out"].scale == 2.0  # its .alpha key: 8 / rank 4
    assert all(w.scale == 1.0 for w in load_lora(_peft_file(tmp_path, stems, None)).weights.values())
    assert all(w.scale == 1.0 for w in load_lora(_peft_file(tmp_path, stems, {"unet.r": 4})).weights.values())


def test_adapter_metadata_bad_values(tmp_path, caplog):
    stems = {"unet.a.to_q": _linear(rank=4)}
    path = _write(tmp_path / "x.safetensors", _pair("unet.a.to_q", ".lora_A.weight", ".lora_B.weight", stems["unet.a.to_q"]),
                  {ADAPTER: "{not json"})
    assert load_lora(path).weights["unet.a.to_q"].scale == 1.0 and ADAPTER in caplog.text
    with pytest.raises(LoraFormatError, match=ADAPTER):
        load_lora(_peft_file(tmp_path, stems, {"unet.r": 4, "unet.lora_alpha": "eight"}))


LOAD_STYLES = [
    # (stem as written, down suffix, up suffix, expected bundle key, style)
    (kohya_stem(Q), ".lora_down.weight", ".lora_up.weight", kohya_stem(Q), "kohya"),
    (f"diffusion_model.{Q}", ".lora_down.weight", ".lora_up.weight", f"diffusion_model.{Q}", "comfy"),
    (f"unet.{Q}", ".lora_A.weight", ".lora_B.weight", f"unet.{Q}", "peft"),
    (f"base_model.model.{Q}", ".lora_A.weight", ".lora_B.weight", Q, "peft"),
    (f"unet.{Q}", ".lora_A.default.weight", ".lora_B.default.weight", f"unet.{Q}", "peft"),
    (f"unet.{Q}", ".lora.down.weight", ".lora.up.weight", f"unet.{Q}", "peft"),
    ("unet.a.attn1.processor.to_q", "_lora.down.weight", "_lora.up.weight",
     "unet.a.attn1.processor.to_q", "peft"),
    (f"unet.{Q}", ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight",
     f"unet.{Q}", "peft"),
]


@pytest.mark.parametrize("stem,down_sfx,up_sfx,key,style", LOAD_STYLES)
def test_load_each_style(tmp_path, stem, down_sfx, up_sfx, key, style):
    weight = _linear(rank=3)
    path = _write(tmp_path / "x.safetensors", _pair(stem, down_sfx, up_sfx, weight))
    bundle = load_lora(path)
    assert bundle.key_style == style
    assert list(bundle.weights) == [key]
    loaded = bundle.weights[key]
    assert loaded.alpha is None and loaded.scale == 1.0
    torch.testing.assert_close(loaded.delta(), weight.delta())


def test_load_reads_alpha_any_rank(tmp_path):
    tensors = _pair(f"diffusion_model.{Q}", ".lora_down.weight", ".lora_up.weight",
                    _linear(rank=16), alpha=8)
    bundle = load_lora(_write(tmp_path / "x.safetensors", tensors))
    assert bundle.weights[f"diffusion_model.{Q}"].scale == 0.5


def test_text_encoder_keys_counted_and_excluded(tmp_path):
    tensors = _pair(kohya_stem(Q), ".lora_down.weight", ".lora_up.weight", _linear())
    for stem in ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te1_text_model_encoder_layers_0_mlp_fc1",
                 "lora_te2_text_model_encoder_layers_0_mlp_fc1",
                 "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"):
        tensors.update(_pair(stem, ".lora_down.weight", ".lora_up.weight", _linear(seed=5)))
    tensors.update(_pair("base_model.model.text_encoder_2.x", ".lora_A.weight", ".lora_B.weight",
                         _linear(seed=6)))
    bundle = load_lora(_write(tmp_path / "x.safetensors", tensors))
    assert list(bundle.weights) == [kohya_stem(Q)]
    assert bundle.text_encoder_keys == 5
    _, report = resolve(bundle, _module_shapes())
    assert report.text_encoder_keys == 5 and "5 text-encoder" in report.summary()


# ---------------------------------------------------------------- resolve

def test_resolve_maps_all_styles():
    w = _linear()
    bundle = LoraBundle(weights={
        Q: w,                                                      # module path
        f"diffusion_model.{OUT0}": _linear(seed=2),                # comfy
        kohya_stem(CONV): _conv(),                                 # kohya
        "unet.middle_block.1.proj_in": _linear(seed=3),            # unet. + path
    })
    resolved, report = resolve(bundle, _module_shapes())
    assert set(resolved) == {Q, OUT0, CONV, "middle_block.1.proj_in"}
    assert resolved[Q] is w
    assert report.matched == report.total == 4 and report.ok
    assert not report.missing and not report.shape_mismatch


def test_resolve_processor_and_to_out_variants():
    bundle = LoraBundle(weights={
        "input_blocks.1.1.transformer_blocks.0.attn1.processor.to_out": _linear(),
        "input_blocks.1.1.transformer_blocks.0.attn1.processor.to_q": _linear(seed=4),
    })
    resolved, report = resolve(bundle, _module_shapes())
    assert set(resolved) == {Q, OUT0} and report.matched == 2


def test_resolve_extra_key_map_strips_prefix_and_suffix():
    bundle = LoraBundle(weights={"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
                                 _linear(),
                                 "lora_unet_down_blocks_0_attentions_0_proj_in": _linear(seed=2)})
    extra = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
             f"diffusion_model.{Q}.weight",
             "lora_unet_down_blocks_0_attentions_0_proj_in": "middle_block.1.proj_in",
             "ignored_tuple_value": ("diffusion_model.x.weight", (0, 0, 8))}
    resolved, report = resolve(bundle, _module_shapes(), extra)
    assert set(resolved) == {Q, "middle_block.1.proj_in"} and report.matched == 2
    _, without = resolve(bundle, _module_shapes())
    assert without.matched == 0 and len(without.missing) == 2


def test_resolve_reports_missing_and_shape_mismatch():
    bundle = LoraBundle(weights={
        Q: _linear(),
        OUT0: _linear(n_in=32, n_out=4),            # delta (4, 32) vs weight (8, 16)
        "output_blocks.9.nowhere": _linear(),
        kohya_stem("not.in.model"): _linear(),
    }, text_encoder_keys=2)
    resolved, report = resolve(bundle, _module_shapes())
    assert set(resolved) == {Q}
    assert isinstance(report, MatchReport)
    assert (report.matched, report.total) == (1, 4)
    assert sorted(report.missing) == sorted(["output_blocks.9.nowhere", kohya_stem("not.in.model")])
    assert report.shape_mismatch == [(OUT0, (4, 32), (8, 16))]
    assert not report.ok
    text = report.summary()
    assert text.startswith("1 of 4 LoRA modules match this model")
    assert "2 not found" in text and "1 shape mismatch" in text
    assert "LoRA delta (4, 32) vs weight (8, 16)" in text and "2 text-encoder" in text


def test_resolve_accepts_same_numel_weight_shape():
    bundle = LoraBundle(weights={CONV: _conv()})
    resolved, report = resolve(bundle, {CONV: (6, 27)})
    assert report.matched == 1 and resolved[CONV].delta((6, 27)).shape == (6, 27)


def test_resolve_loaded_file_end_to_end(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_lora(path, {Q: _linear(), CONV: _conv()})
    resolved, report = resolve(load_lora(path), _module_shapes())
    assert set(resolved) == {Q, CONV} and report.summary().startswith("2 of 2")


# ---------------------------------------------------------------- load errors

def _assert_error(path, *needles):
    with pytest.raises(LoraFormatError) as info:
        load_lora(path)
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_file(tmp_path):
    _assert_error(tmp_path / "nope.safetensors", "not found", "models/loras")


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a safetensors file at all" * 10)
    _assert_error(path, "not a readable safetensors file", "download or save it again")


def test_tiny_file(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"abc")
    _assert_error(path, "not a readable safetensors file", "3 bytes")


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_lora(path, {Q: _linear(rank=32, n_in=256, n_out=256)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_error(path, "not a readable safetensors file", "truncated", "download or save it again")


def test_checkpoint_without_lora(tmp_path):
    path = _write(tmp_path / "ckpt.safetensors",
                  {"model.diffusion_model.x.weight": torch.zeros(2, 2)})
    _assert_error(path, "holds no LoRA weights", "none of its 1 keys",
                  "model.diffusion_model.x.weight", "Load Checkpoint")


def test_down_without_up_names_stem(tmp_path):
    tensors = _pair(kohya_stem(Q), ".lora_down.weight", ".lora_up.weight", _linear())
    tensors["lora_unet_lonely.lora_down.weight"] = torch.zeros(4, 16)
    message = _assert_error(_write(tmp_path / "x.safetensors", tensors), "'lora_unet_lonely'",
                            "no up weight")
    assert "again" in message


def test_rank_mismatch_names_stem_and_shapes(tmp_path):
    tensors = {"lora_unet_bad.lora_down.weight": torch.zeros(4, 16),
               "lora_unet_bad.lora_up.weight": torch.zeros(8, 6)}
    _assert_error(_write(tmp_path / "x.safetensors", tensors),
                  "'lora_unet_bad'", "(4, 16)", "(8, 6)")


# ---------------------------------------------------------------- sanitize_save_name

@pytest.mark.parametrize("name,expected", [
    ("my_lora", "my_lora.safetensors"),
    ("  my lora v2 ", "my_lora_v2.safetensors"),
    ("face-1.0.safetensors", "face-1.0.safetensors"),
    ("x" * 150, "x" * 150 + ".safetensors"),
])
def test_sanitize_good_names(name, expected):
    assert sanitize_save_name(name) == expected


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", "", "   ", ".hidden", "x" * 200,
                                  "semi;colon", "ünïcode", "CON", "name."])
def test_sanitize_bad_names(name):
    with pytest.raises(LoraFormatError) as info:
        sanitize_save_name(name)
    message = str(info.value)
    assert repr(name) in message and ".safetensors" in message


# ---------------------------------------------------------------- atomic writes

def _leftovers(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_atomic_write_bytes_replaces(tmp_path):
    path = tmp_path / "deep" / "status.json"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two" and _leftovers(path.parent) == []


def test_atomic_path_keeps_old_content_on_failure(tmp_path):
    path = tmp_path / "status.json"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_path(path) as tmp:
            assert os.path.dirname(tmp) == str(tmp_path)
            assert os.path.basename(tmp).startswith(".") and tmp.endswith(".tmp")
            with open(tmp, "wb") as handle:
                handle.write(b"half")
            raise RuntimeError("midway")
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_save_lora_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"
    save_lora(path, {Q: _linear()})
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lora_format, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_lora(path, {Q: _linear(seed=9)})
    assert path.read_bytes() == before and _leftovers(tmp_path) == []
