"""Identity stylization's stylized target on ComfyUI's own tiny models: the stylized x0 (content + style LoRA), decoded
by TAESD / TAEF1 (seeded random weights of their real architecture, as a user's decoder file would load) in the face
window, cropped at the face and embedded by the ArcFace-architecture backbone, passes gradients back to every factor
of both LoRAs. And the training node: its defaults are the config's (ConsisLoRA's step counts, named in the
tooltips), it has the identity_target and stylized_prompt inputs, and every bundled API workflow that uses it sets
every one of its inputs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from idstyle_util import SIZE, backbone, face_photo, landmarks_of

pytestmark = pytest.mark.comfy
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def vae_approx(comfy, tmp_path):
    """taesd_decoder (SD1.x, 4 channels) and taef1_decoder (Flux, 16 channels), seeded, in a registered folder."""
    import comfy.taesd.taesd
    import folder_paths
    from seeded import fill_seeded_

    for name, channels, seed in (("taesd_decoder", 4, 3), ("taef1_decoder", 16, 5)):
        net = comfy.taesd.taesd.TAESD(latent_channels=channels)
        with torch.no_grad():
            fill_seeded_(net.taesd_decoder, seed)
        save_file({k: v.detach().clone() for k, v in net.taesd_decoder.state_dict().items()},
                  str(tmp_path / f"{name}.safetensors"))
    folder_paths.add_model_folder_path("vae_approx", str(tmp_path))
    yield tmp_path
    folder_paths.folder_names_and_paths["vae_approx"][0].remove(str(tmp_path))


@pytest.mark.parametrize("arch,targets", [("sd15", "attn"), ("flux", "flux_attn")])
def test_stylized_identity_gradients_reach_both_loras_through_taesd_crop_and_backbone(vae_approx, arch, targets):
    import comfy_tiny
    from idlora.models.lora import LoraNetwork, select_targets
    from idlora.nodes.comfy_adapter import ComfyDiffusion
    from idlora.training.identity_loss import IdentityConfig, IdentityLoss
    from idlora.training.idstyle import IdentityContentTrainer, X0TrainConfig
    from idlora.training.lora_trainer import TrainData

    image = face_photo()
    lms = landmarks_of(image)
    arc = backbone()
    patcher = comfy_tiny.tiny_patcher(arch)
    model = ComfyDiffusion(patcher)
    channels = 16 if arch == "flux" else 4
    latent_hw = (SIZE // 8, SIZE // 8)
    data = TrainData(torch.randn(1, channels, *latent_hw, generator=torch.Generator().manual_seed(0)),
                     comfy_tiny.tiny_cond(arch, patcher, 1, 0), ["a photo of [c] person"])
    stylized = comfy_tiny.tiny_cond(arch, patcher, 1, 7)  # another prompt's conditioning
    config = IdentityConfig(weight=1.0, timestep_range=(0.0, 1.0), decoder="taesd", face_region=True)
    refs = IdentityLoss.reference_embeddings(arc.embed, image.movedim(-1, 1), lms, 112)
    identity = IdentityLoss(model.decoder("taesd"), arc.embed, 112, lms, refs, latent_hw, config)
    style = LoraNetwork(select_targets(model.denoiser, targets), 4, seed=9)
    trainer = IdentityContentTrainer(model, data, X0TrainConfig(steps=2, learning_rate=1e-3, rank=4, seed=1,
                                                                x0_start_step=0, targets=targets), identity,
                                     style=style, stylized_cond=stylized)
    with trainer.session():
        for net in (trainer.network, style):  # B = 0 at init would hide the gradient of A
            for _, layer in net.items():
                torch.nn.init.normal_(layer.up, std=1e-2)
        x0, cond, noise, sigma = trainer.sample_batch()
        x0_sty = trainer.stylized_x0(x0, cond, noise, sigma, trainer.batch_idx)
        assert x0_sty.shape == x0.shape == (1, channels, *latent_hw)
        term = trainer.identity(x0_sty, trainer.batch_idx).mean()
        with style.attached():
            term.backward()
    for net in (trainer.network, style):
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert all(float(g.abs().sum()) > 0 for g in grads)  # every LoRA factor of every layer of both LoRAs
    assert 0.0 < float(term.detach()) < 2.0


@pytest.fixture(scope="module")
def schema(comfy):
    from idlora.nodes.idstyle_nodes import TrainIdentityStyle
    return TrainIdentityStyle.define_schema()


def test_node_defaults_are_the_configs_and_the_tooltips_name_the_papers_step_counts(schema):
    from idlora.training.idstyle import PAPER_STEPS, IdentityStyleConfig

    inputs = {i.id: i for i in schema.inputs}
    d = IdentityStyleConfig()
    expected = {"content_steps": d.content.steps, "x0_start_step": d.content.x0_start_step,
                "learning_rate": d.content.learning_rate, "x0_learning_rate": d.content.x0_learning_rate,
                "style_content_steps": d.style_content_steps, "style_steps": d.style.steps,
                "style_learning_rate": d.style.learning_rate, "noise_offset": d.style.noise_offset,
                "identity_weight": d.identity.weight, "identity_every": d.identity.every,
                "identity_max_noise": d.identity.timestep_range[1], "decoder": d.identity.decoder,
                "face_region": d.identity.face_region, "identity_target": d.identity.target, "rank": d.content.rank}
    assert {k: inputs[k].default for k in expected} == expected
    assert d.identity.target == "stylized" and inputs["identity_target"].options == ["stylized", "reconstruction"]
    assert inputs["stylized_prompt"].default == "a photo of [c] person in the style of [v]"

    def numbers(tip: str) -> list[int]:
        return [int(n) for n in re.findall(r"\b\d+\b", tip)]
    assert numbers(inputs["x0_start_step"].tooltip)[:2] == [PAPER_STEPS["x0_start_step"], PAPER_STEPS["content"]] \
        == [d.content.x0_start_step, d.content.steps]
    assert numbers(inputs["content_steps"].tooltip) == [PAPER_STEPS["content"]] == [d.content.steps]
    assert numbers(inputs["style_steps"].tooltip) == [PAPER_STEPS["style"]] == [d.style.steps]
    assert PAPER_STEPS["style_content"] in numbers(inputs["style_content_steps"].tooltip)
    assert all(i.tooltip for i in schema.inputs)


def test_every_api_workflow_with_the_node_sets_every_input(schema):
    names = {i.id for i in schema.inputs if not getattr(i, "optional", False)}
    found = 0
    for path in sorted((ROOT / "workflows" / "api").glob("*.json")):
        for node_id, node in json.loads(path.read_text()).items():
            if node.get("class_type") == schema.node_id:
                found += 1
                missing = names - set(node["inputs"])
                assert not missing, f"{path.name} node {node_id} lacks {sorted(missing)}"
                assert node["inputs"]["identity_target"] in ("stylized", "reconstruction")
    assert found >= 3
