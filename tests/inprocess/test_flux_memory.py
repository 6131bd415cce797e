"""The memory model (training/memory_model.py, tools/flux_memory.py) against memory measured on the CPU.

ComfyUI's own Flux class, the same block structure as Flux-dev but 256 wide (4 heads of 64) with 2 double and 2
single blocks (7.3 M parameters, 29 MB in float32), a 384 px image and 128 text tokens: the step's activations
(40 to 85 MB) and the weights are each many times the measurement's noise (about 2 MB), and a step takes seconds.
A full-width Flux (3072 wide, 1 double + 1 single block: 0.55 B parameters) would take minutes per step here and its
activations at a size a step can afford would be a few percent of its 2.2 GB of weights.

Predicted on the meta device in this process; measured in a fresh process (peak resident memory of a LoRA training
step in the trainer's session: forward, backward, AdamW; without and with gradient checkpointing)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.comfy

TOLERANCE = 0.15


def test_flux_memory_prediction_matches_the_cpu(comfy):
    import flux_memory  # tools/
    r = flux_memory.validate(str(comfy))
    lines = []
    for key in ("plain", "ckpt"):
        row = r[key]
        for what in ("step", "total"):
            pred, meas = row[f"predicted_{what}"], row[f"measured_{what}"]
            lines.append(f"{key} {what}: predicted {pred / 2**20:.1f} MiB, measured {meas / 2**20:.1f} MiB "
                         f"({pred / meas - 1:+.1%})")
    print("\n".join(lines))
    for key in ("plain", "ckpt"):
        row = r[key]
        assert row["predicted_step"] == pytest.approx(row["measured_step"], rel=TOLERANCE), lines
        assert row["predicted_total"] == pytest.approx(row["measured_total"], rel=TOLERANCE), lines
    for what in ("predicted_step", "measured_step", "predicted_total", "measured_total"):
        assert r["ckpt"][what] < r["plain"][what], (what, lines)
    # the activations are most of the step and the weights most of the rest: both far above the noise
    assert r["ckpt"]["measured_step"] > 10 * 2**20 and r["plain"]["weights"] > 10 * 2**20


def test_flux_dev_on_meta_has_the_real_architecture(comfy):
    """The config is the one ComfyUI detects from a flux1-dev state dict (its keys and shapes: these weights') and
    maps to supported_models.Flux; it builds 11.9 B parameters on the meta device; the target sets count right."""
    import comfy.model_detection
    import comfy.supported_models
    import flux_memory
    from idlora.models.lora import select_targets
    model = flux_memory.build_flux(flux_memory.FLUX_DEV, "meta")
    sd = model.state_dict()
    assert comfy.model_detection.detect_unet_config(sd, "") == flux_memory.FLUX_DEV
    assert type(comfy.model_detection.model_config_from_unet(sd, "")) is comfy.supported_models.Flux
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.9e9, rel=0.01)
    attn = select_targets(model, flux_memory.TARGETS["attn"])
    assert len(attn) == 19 * 4 + 38 * 2
    assert len(select_targets(model, flux_memory.TARGETS["all linear"])) == 19 * 10 + 38 * 3
