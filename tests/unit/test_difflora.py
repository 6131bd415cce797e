"""DiffLoRA core: flat LoRA layout, WP loss, LAE, MIF, DiT, DDIM, and learning a synthetic LoRA population."""
from __future__ import annotations

import pytest
import torch

from idlora.models.dit import DiTConfig, LoraDiT, MixedImageFeatures
from idlora.models.lae import LaeConfig, LoraAutoencoder, lae_loss, weight_preserved_loss
from idlora.training.difflora import (DiffLora, DiffLoraFileError, DiTTrainConfig, DiTTrainer, LaeTrainConfig,
                                      LaeTrainer, LinearSchedule, ddim_sample, encode_population, load_difflora,
                                      save_difflora, schedule_of)
from idlora.training.lora_format import LoraWeight
from idlora.training.lora_trainer import TrainingInputError
from idlora.training.lora_vector import LayoutError, LoraLayout

SHAPES = {"a.to_q": (32, 24), "a.to_k": (32, 16), "b.proj": (48, 32)}
RANK = 2


def lora(seed: int, shapes=SHAPES, rank=RANK, alpha=2.0) -> dict[str, LoraWeight]:
    g = torch.Generator().manual_seed(seed)
    return {n: LoraWeight(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g), alpha)
            for n, (o, i) in shapes.items()}


# -- layout ---------------------------------------------------------------------------------------------

def test_flatten_is_b_then_a_transposed_and_round_trips_exactly():
    w = {"x": LoraWeight(torch.arange(6.).reshape(2, 3), torch.arange(8.).reshape(4, 2) + 100, 1.0)}
    layout = LoraLayout.of(w)
    v = layout.flatten(w)
    assert v.tolist() == [100, 101, 102, 103, 104, 105, 106, 107, 0, 3, 1, 4, 2, 5]
    back = layout.unflatten(v)["x"]
    assert torch.equal(back.down, w["x"].down) and torch.equal(back.up, w["x"].up) and back.alpha == 1.0


def test_round_trip_with_conv_layers_and_json_layout():
    w = lora(0)
    w["c.conv"] = LoraWeight(torch.randn(RANK, 8, 3, 3), torch.randn(16, RANK, 1, 1), None)
    layout = LoraLayout.of(w)
    again = LoraLayout.from_json(layout.to_json())
    assert again == layout and again.length == sum(RANK * (o + i) for o, i in SHAPES.values()) + RANK * (16 + 72)
    out = again.unflatten(layout.flatten(w))
    for n in w:
        assert torch.equal(out[n].down, w[n].down) and torch.equal(out[n].up, w[n].up)
        assert out[n].alpha == w[n].alpha


@pytest.mark.parametrize("change, words", [
    (lambda w: w.pop("a.to_k"), "missing"),
    (lambda w: w.__setitem__("a.to_k", LoraWeight(torch.zeros(3, 16), torch.zeros(32, 3), 2.0)), "same rank"),
    (lambda w: w.__setitem__("a.to_k", LoraWeight(torch.zeros(2, 16), torch.zeros(32, 2), 4.0)), "alpha"),
])
def test_layout_mismatch_names_the_layer(change, words):
    layout = LoraLayout.of(lora(0))
    w = lora(1)
    change(w)
    with pytest.raises(LayoutError, match=words):
        layout.flatten(w)
    with pytest.raises(LayoutError, match="another LoRA layout"):
        layout.unflatten(torch.zeros(layout.length + 1))


# -- losses and modules ------------------------------------------------------------------------------------

def test_weight_preserved_loss_matches_eq2_by_hand():
    x = torch.tensor([2.0, -1.0, 0.5, 0.0])
    x_hat = torch.tensor([1.5, -1.0, 1.0, 3.0])
    # (|2|*0.5 + |-1|*0 + |0.5|*0.5 + |0|*3) / 4 = (1 + 0 + 0.25 + 0) / 4
    assert weight_preserved_loss(x, x_hat).item() == pytest.approx(0.3125)
    # with the reconstruction term: mse = (0.25 + 0 + 0.25 + 9) / 4; scale 2 divides both inputs by 2
    assert lae_loss(x, x_hat, 1.0, 0.5).item() == pytest.approx(9.5 / 4 + 0.5 * 0.3125)
    assert lae_loss(x, x_hat, 2.0, 1.0).item() == pytest.approx(9.5 / 16 + 0.3125 / 4)


def test_lae_shapes_and_compression_ratio():
    cfg = LaeConfig(length=1000, patch=8, levels=3, channels=16, latent_channels=2, heads=2, mlp_hidden=16)
    lae = LoraAutoencoder(cfg)
    assert cfg.padded_length == 1024 and cfg.latent_shape == (2, 32)
    assert cfg.compression == pytest.approx(1000 / 64)
    z = lae.encode(torch.randn(3, 1000))
    assert z.shape == (3, 2, 32) and lae.decode(z).shape == (3, 1000)
    with pytest.raises(ValueError, match="1000"):
        lae.encode(torch.randn(3, 999))
    assert LaeConfig(length=10 ** 6, patch=64, levels=5, latent_channels=4).compression == pytest.approx(256, rel=1e-3)


def test_mif_gate_is_a_softmax_over_two_experts():
    mif = MixedImageFeatures(6, 4, 8)
    face, image = torch.randn(5, 6), torch.randn(5, 4)
    s = mif.scores(face, image)
    assert s.shape == (5, 2) and torch.allclose(s.sum(1), torch.ones(5)) and (s > 0).all()
    expect = s[:, :1] * mif.image_mlp(image) + s[:, 1:] * mif.face_mlp(face)
    assert torch.allclose(mif(face, image), expect)
    with pytest.raises(ValueError, match="face embedding"):
        mif(torch.randn(5, 7), image)


def test_dit_adaln_zero_starts_at_zero_output_and_checks_shapes():
    dit = LoraDiT(DiTConfig(in_channels=3, tokens=7, face_dim=6, image_dim=4, hidden=16, depth=2, heads=2))
    x = torch.randn(2, 3, 7)
    cond = dit.condition(torch.randn(2, 6), torch.randn(2, 4))
    assert torch.equal(dit(x, torch.tensor([3, 900]), cond), torch.zeros(2, 3, 7))
    with pytest.raises(ValueError, match="the LAE this DiT"):
        dit(torch.randn(2, 3, 8), torch.tensor([1, 2]), cond)


def test_linear_schedule_is_the_papers():
    s = LinearSchedule()
    betas = 1 - s.alphas_cumprod[1:] / s.alphas_cumprod[:-1]
    assert s.steps == 1000 and betas[0].item() == pytest.approx(1e-4 + 0.0119 / 999, rel=1e-3)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-3) and 1 - s.alphas_cumprod[0].item() == pytest.approx(1e-4, rel=1e-3)
    assert s.ddim_timesteps(100)[0] == 999 and s.ddim_timesteps(100)[-1] == 0 and len(s.ddim_timesteps(100)) == 100
    with pytest.raises(ValueError, match="DDIM steps"):
        s.ddim_timesteps(0)


def test_ddim_is_deterministic_for_a_seed():
    torch.manual_seed(0)
    dit = LoraDiT(DiTConfig(in_channels=2, tokens=5, face_dim=3, image_dim=3, hidden=16, depth=1, heads=2))
    for p in dit.parameters():  # leave adaLN-Zero so the output depends on the input
        torch.nn.init.normal_(p, std=0.2)
    cond = dit.condition(torch.randn(2, 3), torch.randn(2, 3))
    s = LinearSchedule()
    a = ddim_sample(dit, cond, (2, 2, 5), s, steps=20, seed=7)
    torch.manual_seed(123)  # the global RNG plays no part
    b = ddim_sample(dit, cond, (2, 2, 5), s, steps=20, seed=7)
    c = ddim_sample(dit, cond, (2, 2, 5), s, steps=20, seed=8)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_trainer_configs_reject_bad_values():
    with pytest.raises(TrainingInputError, match="wp_weight"):
        LaeTrainConfig(wp_weight=-1).validate()
    with pytest.raises(TrainingInputError, match="beta_end"):
        DiTTrainConfig(beta_start=0.02, beta_end=0.01).validate()
    with pytest.raises(TrainingInputError, match="face or no image"):
        DiTTrainer(torch.zeros(2, 2, 3), [torch.zeros(1, 4), torch.zeros(0, 4)], [torch.zeros(1, 4)] * 2,
                   DiTTrainConfig(steps=1, hidden=8, depth=1, heads=2))


# -- a synthetic population with known structure -------------------------------------------------------------

N, CODE = 16, 4


@pytest.fixture(scope="module")
def population():
    """LoRAs generated from a random linear map of 4-d identity codes; face / image embeddings are other noisy
    linear maps of the same codes (3 references per identity)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(N, CODE, generator=g)
    layout = LoraLayout.of(lora(0))
    vectors = codes @ (0.02 * torch.randn(layout.length, CODE, generator=g)).T + 0.01 * torch.randn(layout.length,
                                                                                                       generator=g)
    mf, mi = torch.randn(CODE, 64, generator=g), torch.randn(CODE, 32, generator=g)
    face = lambda i, k: codes[i] @ mf + 0.1 * torch.randn(k, 64, generator=g)  # noqa: E731
    image = lambda i, k: codes[i] @ mi + 0.3 * torch.randn(k, 32, generator=g)  # noqa: E731
    return {"layout": layout, "vectors": vectors, "face": [face(i, 3) for i in range(N)],
            "image": [image(i, 3) for i in range(N)], "query_face": torch.cat([face(i, 1) for i in range(N)]),
            "query_image": torch.cat([image(i, 1) for i in range(N)])}


LAE_CFG = dict(steps=600, learning_rate=4e-3, batch_size=8, patch=8, levels=3, channels=32, latent_channels=4,
               mlp_hidden=64)
DIT_CFG = dict(steps=400, learning_rate=1e-3, batch_size=16, hidden=64, depth=2, heads=4)


@pytest.fixture(scope="module")
def trained(population, tmp_path_factory):
    lt = LaeTrainer(population["vectors"], LaeTrainConfig(**LAE_CFG))
    lt.run()
    latents = encode_population(lt.module, population["vectors"])
    scale = float(latents.std())
    dt = DiTTrainer(latents / scale, population["face"], population["image"], DiTTrainConfig(**DIT_CFG))
    dt.run()
    path = save_difflora(tmp_path_factory.mktemp("dl") / "synthetic.safetensors", population["layout"], lt.module,
                         dt.module, scale, schedule_of(dt.cfg), {"targets": "attn"})
    return {"lae": lt, "dit": dt, "path": path,
            "model": DiffLora(population["layout"], lt.module, dt.module, scale, schedule_of(dt.cfg), {})}


def test_lae_reconstructs_the_population_within_tolerance(population, trained):
    report = trained["lae"].report()
    x = population["vectors"]
    mean_baseline = ((x - x.mean(0)).norm(dim=1) / x.norm(dim=1)).mean().item()
    # stated tolerance: mean relative error below 0.2, five times better than predicting the population mean
    assert report["relative_error_mean"] < 0.2 and report["relative_error_mean"] < mean_baseline / 5
    assert report["compression"] == pytest.approx(population["layout"].length / (4 * 12))


def test_dit_samples_the_conditioned_identitys_lora(population, trained):
    """Nearest true LoRA to each sampled LoRA, for an unseen reference of every identity: chance is 1/16."""
    model = trained["model"]
    samples = model.sample(population["query_face"], population["query_image"], steps=50, seed=1)
    decoded = torch.stack([population["layout"].flatten(s) for s in samples])
    nearest = torch.cdist(decoded, population["vectors"]).argmin(1)
    accuracy = (nearest == torch.arange(N)).float().mean().item()
    assert accuracy >= 0.8, f"nearest-identity accuracy {accuracy:.2f} (chance {1 / N:.3f})"


def test_saved_file_reloads_and_samples_identically(population, trained):
    loaded = load_difflora(trained["path"])
    assert loaded.layout == population["layout"] and loaded.meta == {"targets": "attn"}
    face, image = population["query_face"][:2], population["query_image"][:2]
    a = trained["model"].sample(face, image, steps=10, seed=3)
    b = loaded.sample(face, image, steps=10, seed=3)
    for n in a[0]:
        assert torch.allclose(a[0][n].up, b[0][n].up, atol=1e-6)
        assert torch.allclose(a[1][n].down, b[1][n].down, atol=1e-6)


def test_lae_only_file_cannot_sample_and_other_files_are_refused(population, trained, tmp_path):
    path = save_difflora(tmp_path / "lae.safetensors", population["layout"], trained["lae"].module)
    lae_only = load_difflora(path)
    assert lae_only.dit is None
    with pytest.raises(DiffLoraFileError, match="Train DiffLoRA"):
        lae_only.sample(population["query_face"][:1], population["query_image"][:1])
    with pytest.raises(DiffLoraFileError, match="does not exist"):
        load_difflora(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(DiffLoraFileError, match="not a readable"):
        load_difflora(tmp_path / "junk.safetensors")


def test_trainer_resume_equals_uninterrupted(population):
    cfg = LaeTrainConfig(**{**LAE_CFG, "steps": 6})
    full = LaeTrainer(population["vectors"], cfg)
    full.run()
    part = LaeTrainer(population["vectors"], cfg)
    for _ in range(3):
        part.train_step()
    state = part.state_dict()
    resumed = LaeTrainer(population["vectors"], cfg)
    resumed.load_state_dict(state)
    resumed.run()
    for a, b in zip(full.module.state_dict().values(), resumed.module.state_dict().values()):
        assert torch.equal(a, b)
