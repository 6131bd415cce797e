"""The identity-stylization job: phases content -> style_content -> style (identity target 'reconstruction'), or
style_content -> style -> content (target 'stylized', the default: the content phase needs the style LoRA and
tunes it); cancel and resume within a phase, and a cancel keeps the LoRAs of finished phases (tiny pure-torch
model, real job manager)."""
from __future__ import annotations

import time

import pytest
import torch

from idlora.training.identity_loss import IdentityConfig, IdentityLoss
from idlora.training.idstyle import (STYLE_PHASE_FILE, IdentityStyleConfig, IdentityStyleData, IdentityStyleTask,
                                     Resources, X0TrainConfig)
from idlora.training.jobs import JobManager, JobState
from idlora.training.lora_format import load_lora
from idlora.training.lora_trainer import prepare_data
from idstyle_util import backbone, face_photo, landmarks_of
from tiny_torch import TinyDiffusion

RESUME_TOL = 1e-6
STEPS = {"content": 16, "style_content": 6, "style": 14}  # room to cancel inside a phase on a slow machine


def _cfg(target: str = "reconstruction") -> IdentityStyleConfig:
    common = dict(learning_rate=3e-3, rank=4, seed=3, targets="attn")
    return IdentityStyleConfig(
        content=X0TrainConfig(steps=STEPS["content"], x0_start_step=4, x0_learning_rate=1e-3, **common),
        style_content_steps=STEPS["style_content"],
        style=X0TrainConfig(steps=STEPS["style"], noise_offset=0.03, **common),
        identity=IdentityConfig(weight=0.5, timestep_range=(0.0, 0.6), target=target))


def _loader(sources: dict) -> Resources:
    return Resources(TinyDiffusion(seed=sources["seed"]), backbone().embed)


@pytest.fixture(scope="module")
def data() -> IdentityStyleData:
    model = TinyDiffusion(seed=0)
    photo = face_photo("obama.jpg")
    style = face_photo("astronaut.jpg")  # a style image with a face in it is fine
    lms = landmarks_of(photo)
    refs = IdentityLoss.reference_embeddings(backbone().embed, photo.movedim(-1, 1), lms, 112)
    style_data = prepare_data(model, style, "an image in the style of [v]")
    stylized = prepare_data(model, photo, "a photo of [c] person in the style of [v]").cond
    return IdentityStyleData(prepare_data(model, photo, "a photo of [c] person"), style_data,
                             prepare_data(model, style, "a [v]").cond, lms, refs, stylized_cond=stylized)


class SlowTask(IdentityStyleTask):
    """Sleeps between steps, so the test can cancel in a chosen phase."""

    def trainer(self, *args):
        t = super().trainer(*args)
        step = t.train_step

        def slow():
            time.sleep(0.03)
            return step()
        t.train_step = slow
        return t


def _outputs(root, tag: str) -> dict:
    return {p: {"path": str(root / f"{tag}_{p}.safetensors"), "name": f"idlora/{tag}_{p}.safetensors"}
            for p in ("content", "style")}


@pytest.fixture
def manager(tmp_path):
    m = JobManager(tmp_path / "jobs", checkpoint_every=3)
    m.register("idstyle", lambda cfg, d: SlowTask.from_config(cfg, d, _loader))
    yield m
    m.shutdown()


def _submit(m, tmp_path, data, tag, target="reconstruction"):
    return m.submit(SlowTask(_cfg(target), _outputs(tmp_path, tag), {"seed": 0}, _loader, data=data), name=tag)


def _wait(m, job_id, pred, timeout=120):
    t = time.time()
    while not pred(m.get(job_id).status):
        assert time.time() - t < timeout, m.get(job_id).status
        time.sleep(0.005)


def _same(a: str, b: str) -> float:
    wa, wb = load_lora(a).weights, load_lora(b).weights
    assert wa.keys() == wb.keys()
    return max(max(float((wa[k].down - wb[k].down).abs().max()), float((wa[k].up - wb[k].up).abs().max()))
               for k in wa)


def test_phases_run_in_order_and_write_both_loras(manager, tmp_path, data):
    job = _submit(manager, tmp_path, data, "ref")
    manager.wait(job.id, 120)
    s = job.status
    assert s.state == JobState.SUCCEEDED, s.error
    assert s.phases == ["content", "style_content", "style"] and s.total == sum(STEPS.values())
    phases = [p for _, p, _ in job.losses]
    assert phases == [p for p, n in STEPS.items() for _ in range(n)]
    assert [st for st, _, _ in job.losses] == list(range(1, sum(STEPS.values()) + 1))  # one count across phases
    content, style = load_lora(s.result["content_path"]), load_lora(s.result["style_path"])
    assert content.metadata["idlora_phase"] == "content" and style.metadata["idlora_phase"] == "style"
    assert 0 < s.result["identity_loss_last"] < 2
    assert (job.dir / "style_content.safetensors").exists()


def test_cancel_in_content_resumes_in_content(manager, tmp_path, data):
    ref = _submit(manager, tmp_path, data, "ref")
    manager.wait(ref.id, 120)
    job = _submit(manager, tmp_path, data, "cut")
    _wait(manager, job.id, lambda s: s.step >= 4)
    manager.cancel(job.id)
    _wait(manager, job.id, lambda s: s.state == JobState.CANCELLED)
    ckpt = torch.load(job.dir / "checkpoint.pt", weights_only=True)
    assert ckpt["phase"] == "content" and 4 <= ckpt["step"] < STEPS["content"]
    assert not (tmp_path / "cut_content.safetensors").exists()
    manager.resume(job.id)
    manager.wait(job.id, 120)
    assert job.status.state == JobState.SUCCEEDED and job.status.resumes == 1
    assert [p for _, p, _ in job.losses][:STEPS["content"]] == ["content"] * STEPS["content"]
    for phase in ("content", "style"):
        assert _same(ref.status.result[f"{phase}_path"], job.status.result[f"{phase}_path"]) < RESUME_TOL


def test_cancel_in_style_keeps_the_content_lora(manager, tmp_path, data):
    ref = _submit(manager, tmp_path, data, "ref")
    manager.wait(ref.id, 120)
    job = _submit(manager, tmp_path, data, "cut")
    first_style = STEPS["content"] + STEPS["style_content"] + 2
    _wait(manager, job.id, lambda s: s.step >= first_style)
    manager.cancel(job.id)
    _wait(manager, job.id, lambda s: s.state == JobState.CANCELLED)
    content = tmp_path / "cut_content.safetensors"
    assert content.exists() and not (tmp_path / "cut_style.safetensors").exists()
    kept = content.stat().st_mtime_ns
    assert torch.load(job.dir / "checkpoint.pt", weights_only=True)["phase"] == "style"
    manager.resume(job.id)
    manager.wait(job.id, 120)
    assert job.status.state == JobState.SUCCEEDED
    assert content.stat().st_mtime_ns == kept  # the content phase did not run again
    assert _same(ref.status.result["style_path"], str(tmp_path / "cut_style.safetensors")) < RESUME_TOL
    assert _same(ref.status.result["content_path"], str(content)) < RESUME_TOL


# -- identity target 'stylized' ----------------------------------------------------------------------------------

STYLIZED_ORDER = ("style_content", "style", "content")


def test_stylized_target_trains_the_style_lora_first_and_tunes_it_in_the_content_phase(manager, tmp_path, data):
    job = _submit(manager, tmp_path, data, "sty", "stylized")
    manager.wait(job.id, 120)
    s = job.status
    assert s.state == JobState.SUCCEEDED, s.error
    assert s.phases == list(STYLIZED_ORDER) and s.total == sum(STEPS.values())
    assert [p for _, p, _ in job.losses] == [p for p in STYLIZED_ORDER for _ in range(STEPS[p])]
    content, style = load_lora(s.result["content_path"]), load_lora(s.result["style_path"])
    before = load_lora(str(job.dir / STYLE_PHASE_FILE))  # the style LoRA as its phase left it
    assert content.metadata["idlora_phase"] == "content" and style.metadata["idlora_phase"] == "style"
    assert "stylized x0" in style.metadata["idlora_identity_tuned"]
    assert _same(str(job.dir / STYLE_PHASE_FILE), s.result["style_path"]) > 0  # the identity term moved it
    assert before.weights.keys() == style.weights.keys()
    assert 0 < s.result["identity_loss_last"] < 2
    assert s.result["lora"] == s.result["style_lora"]


def test_stylized_cancel_in_content_resumes_with_the_tuned_style_lora(manager, tmp_path, data):
    ref = _submit(manager, tmp_path, data, "ref", "stylized")
    manager.wait(ref.id, 120)
    job = _submit(manager, tmp_path, data, "cut", "stylized")
    first_content = STEPS["style_content"] + STEPS["style"]
    _wait(manager, job.id, lambda s: s.step >= first_content + 6)  # inside the x0 steps (x0_start_step 4)
    manager.cancel(job.id)
    _wait(manager, job.id, lambda s: s.state == JobState.CANCELLED)
    ckpt = torch.load(job.dir / "checkpoint.pt", weights_only=True)
    assert ckpt["phase"] == "content" and 6 <= ckpt["step"] < STEPS["content"] and "style_network" in ckpt
    assert not (tmp_path / "cut_content.safetensors").exists()
    assert (tmp_path / "cut_style.safetensors").exists()  # the style phase's LoRA is kept
    manager.resume(job.id)
    manager.wait(job.id, 120)
    assert job.status.state == JobState.SUCCEEDED and job.status.resumes == 1
    for phase in ("content", "style"):
        assert _same(ref.status.result[f"{phase}_path"], job.status.result[f"{phase}_path"]) < RESUME_TOL


def test_a_job_saved_before_the_identity_target_resumes_as_reconstruction(tmp_path, data):
    cfg = _cfg("stylized").to_dict()
    del cfg["identity"]["target"]
    data.save(tmp_path)
    task = IdentityStyleTask.from_config({"idstyle": cfg, "outputs": _outputs(tmp_path, "old"), "sources": {}},
                                         tmp_path, _loader)
    assert task.cfg.identity.target == "reconstruction" and task.phases == ["content", "style_content", "style"]
