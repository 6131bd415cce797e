"""User target patterns are matched with RE2: a catastrophic pattern costs microseconds, not the server."""
from __future__ import annotations

import re
import time

import pytest
from torch import nn

from idlora.models.lora import PRESET_ARCH, PRESETS, LoraConfigError, select_targets
from idlora.training.lora_trainer import LoraTrainConfig, TrainingInputError
from tiny_torch import TinyDenoiser


class LongNames(nn.Module):
    """Module names long enough that Python's backtracking engine would take years on '(.+)+!'."""

    def __init__(self):
        super().__init__()
        block = nn.Module()
        for i in range(4):
            setattr(block, "a" * 40 + str(i), nn.Linear(2, 2))
        self.add_module("b" * 30, block)


def test_a_catastrophic_pattern_returns_at_once():
    t = time.perf_counter()
    with pytest.raises(LoraConfigError, match="matched none"):
        select_targets(LongNames(), "(.+)+!")
    assert time.perf_counter() - t < 0.5
    assert select_targets(LongNames(), "(a+)+3$").keys() == {"b" * 30 + "." + "a" * 40 + "3"}


def test_python_re_would_hang_on_that_pattern():
    """Why RE2: the same search with Python's engine on a 26-character name already takes measurable time, and it
    doubles per character (the names of a real U-Net are 60+ characters)."""
    t = time.perf_counter()
    re.compile("(.+)+!").search("x" * 22)
    assert time.perf_counter() - t > 0.05


@pytest.mark.parametrize("pattern,why", [("(?=attn)to_k", "no lookaround"), ("(a)\\1", "backreferences"),
                                         ("attn[", "missing ]"), ("x" * 2001, "the limit is 2000")])
def test_a_bad_pattern_is_refused_before_any_model_loads(pattern, why):
    with pytest.raises(TrainingInputError, match="targets") as e:
        LoraTrainConfig(targets=pattern).validate()
    assert why.split()[-1] in str(e.value) or why in str(e.value), str(e.value)


def test_presets_and_ordinary_patterns_still_select_the_same_layers():
    model = TinyDenoiser()  # a U-Net-like model: the DiT presets are refused on it (tests/inprocess/test_flux.py)
    for name, pattern in PRESETS.items():
        if PRESET_ARCH[name] not in (None, "unet"):
            with pytest.raises(LoraConfigError, match=f"targets = '{name}' is a preset for"):
                select_targets(model, name)
            continue
        got = select_targets(model, name)
        kinds = (nn.Linear, nn.Conv2d) if name == "all_linear_conv" else (nn.Linear,)
        want = {n for n, m in model.named_modules() if n and isinstance(m, kinds) and re.search(pattern, n)}
        assert set(got) == want
    assert set(select_targets(model, r"attn2\.to_(k|v)$")) == {
        n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and re.search(r"attn2\.to_(k|v)$", n)}
