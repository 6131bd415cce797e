"""tools/build_lora_dataset.py on the tiny SD1.5 checkpoint with the random-weight demo face and CLIP embedders
(ComfyUI in-process in the tool's processes): two shards built at the same time into one folder cover every
identity once, a re-run trains nothing (without loading the model), a changed image rebuilds only its identity, bad
input exits with status 2, and the dataset feeds tools/difflora_train.py (LAE, then DiT) end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import build_lora_dataset  # tools/
import difflora_train  # tools/
import server_util
from idlora.training.difflora import load_difflora
from idlora.training.lora_dataset import load_population

pytestmark = pytest.mark.comfy  # ComfyUI in-process, in the tool's processes (no server)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "build_lora_dataset.py"
FACES = ROOT / "tests" / "assets" / "faces"
PHOTOS = {"id0": "obama.jpg", "id1": "biden.jpg", "id2": "obama2.jpg", "id3": "obama3.jpg"}
TIMEOUT = 180


def demo_models() -> Path:
    d = os.environ.get("IDLORA_DEMO_MODELS")
    if not d or not (Path(d) / "clip").is_dir():
        pytest.fail("IDLORA_DEMO_MODELS is not set to the demo models: run the tests with ./idlora test")
    return Path(d)


def make_identities(root: Path) -> Path:
    """4 identities x 2 images at 64 px: a crop of the photo's top left and the whole photo (the demo face
    embedder finds a face in at least one of them)."""
    for name, photo in PHOTOS.items():
        d = root / name
        d.mkdir(parents=True)
        with Image.open(FACES / photo) as im:
            im = im.convert("RGB")
            s = min(im.size) * 4 // 5
            im.crop((0, 0, s, s)).resize((64, 64)).save(d / "crop.png")
            im.resize((64, 64)).save(d / "whole.jpg")
    return root


def args(data: Path, out: Path, *extra: str) -> list[str]:
    demo = demo_models()
    return [str(SCRIPT), "--checkpoint", str(server_util.tiny_ckpt()), "--data", str(data), "--out", str(out),
            "--face-backend", "arcface-onnx", "--face-root", str(demo / "insightface"), "--face-pack", "idlora_demo",
            "--clip-arch", "idlora-demo-tiny-clip", "--clip-checkpoint",
            str(demo / "clip" / "idlora_demo_random_clip.safetensors"), "--res", "64", "--steps", "2", "--rank", "2",
            "--lr", "1e-3", "--log-every", "1", *extra]


def env(**kw) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return dict(e, OMP_NUM_THREADS="1", **kw)


def run(cmd: list[str], label: str, **kw) -> subprocess.CompletedProcess:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env(**kw), text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=TIMEOUT)
    print(f"{label}: {time.perf_counter() - t:.1f} s")
    return proc


def summary(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-6000:]
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


def mtimes(out: Path) -> dict[str, int]:
    return {n: (out / n / "lora.safetensors").stat().st_mtime_ns for n in PHOTOS}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_identities(tmp_path_factory.mktemp("identities"))


@pytest.fixture(scope="module")
def built(data, tmp_path_factory) -> Path:
    """Shards 0 and 1 of 2, at the same time, into one folder."""
    out = tmp_path_factory.mktemp("built") / "ds"
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, *args(data, out, "--shard", str(i), "--shards", "2")], cwd=ROOT,
                              env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    print(f"2 shards at once: {time.perf_counter() - t:.1f} s")
    for p, o in zip(procs, outputs):
        assert p.returncode == 0, o[-6000:]
    (out.parent / "shards.json").write_text(json.dumps([json.loads(o.strip().splitlines()[-1]) for o in outputs]))
    return out


def test_two_shards_build_disjoint_identities_whose_union_is_all(built):
    shards = json.loads((built.parent / "shards.json").read_text())
    assert [(s["shard"], s["shards"]) for s in shards] == [(0, 2), (1, 2)]
    assert [s["trained"] for s in shards] == [["id0", "id2"], ["id1", "id3"]]
    assert [s["identities"] for s in shards] == [s["trained"] for s in shards]
    pop = load_population(built)
    assert pop.names == sorted(PHOTOS)
    entry = pop.entries[0]
    assert entry["base_model"] == "sd15" and entry["rank"] == 2 and entry["images"] == 2 and entry["faces"] >= 1
    assert entry["embedders"] == {"face": "arcface (idlora_demo)",
                                  "image": "open_clip idlora-demo-tiny-clip idlora_demo_random_clip.safetensors"}
    assert all(f.shape[1] == 512 and i.shape == (2, 64) for f, i in zip(pop.face, pop.image))


def test_rerun_trains_nothing_and_a_changed_image_rebuilds_only_its_identity(data, built, monkeypatch):
    before = mtimes(built)
    # under torchrun the shard comes from RANK / WORLD_SIZE (in-process: a finished shard loads no model)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    again = build_lora_dataset.build_shard(build_lora_dataset.parse_args(args(data, built)[1:]))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert (again["shard"], again["shards"], again["trained"], again["skipped"]) == (1, 2, [], ["id1", "id3"])
    proc = run(args(data, built), "re-run, 1 shard")
    again = summary(proc)
    assert again["trained"] == [] and again["skipped"] == sorted(PHOTOS) and "loaded" not in proc.stdout
    manifest = json.loads((built / "manifest.json").read_text())
    assert [e["name"] for e in manifest["identities"]] == sorted(PHOTOS)
    assert mtimes(built) == before

    with Image.open(FACES / "obama3.jpg") as im:  # id2 gets other pixels in one of its images
        im.convert("RGB").resize((64, 64)).save(data / "id2" / "whole.jpg")
    proc = run(args(data, built), "re-run after id2 changed")
    changed = summary(proc)
    assert changed["trained"] == ["id2"] and changed["skipped"] == ["id0", "id1", "id3"]
    after = mtimes(built)
    assert after["id2"] != before["id2"] and all(after[n] == before[n] for n in ("id0", "id1", "id3"))


def test_bad_input_exits_2_with_a_message(data, built, tmp_path):
    def check(argv: list[str]) -> None:  # in-process: these fail before ComfyUI is imported
        build_lora_dataset.build_shard(build_lora_dataset.parse_args(argv[1:]))

    with pytest.raises(ValueError, match="--shard = 2 is invalid for 2 shards"):
        check(args(data, tmp_path / "o", "--shard", "2", "--shards", "2"))
    a = args(data, tmp_path / "o")
    a[a.index("--face-root") + 1] = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="insightface pack 'idlora_demo' not found"):
        check(a)
    with pytest.raises(ValueError, match="data folder .* does not exist"):
        check(args(tmp_path / "none", tmp_path / "o"))
    with pytest.raises(ValueError, match="--trainer meta_lora needs --meta-down"):
        check(args(data, tmp_path / "o", "--trainer", "meta_lora"))
    with pytest.raises(ValueError, match="needs --face-root"):
        check([x for x in args(data, tmp_path / "o") if x != str(demo_models() / "insightface")
               and x != "--face-root"])
    # an identity without a face stops the build before anything is trained, naming it
    faceless = tmp_path / "faceless"
    (faceless / "nobody").mkdir(parents=True)
    with Image.open(FACES / "no_face.jpg") as im:
        im.convert("RGB").resize((64, 64)).save(faceless / "nobody" / "1.png")
    proc = run(args(faceless, tmp_path / "o2"), "identity without a face")
    assert proc.returncode == 2 and "no face was found in any image of identity ['nobody']" in proc.stdout, \
        proc.stdout[-3000:]
    assert "loaded" not in proc.stdout  # found before the checkpoint is loaded
    assert not (tmp_path / "o2" / "nobody" / "entry.json").exists()


def train_difflora(dataset: Path, tmp_path: Path, steps: int, patch: int):
    """A small LAE, then a small DiT on ``dataset`` with tools/difflora_train.py in-process (pure torch; the torchrun
    runs are in test_difflora_cli.py); both must exit 0. Returns the loaded DiffLoRA."""
    def train(*argv: str) -> int:
        return difflora_train.train(difflora_train.parse_args(list(argv)), 0, 1, torch.device("cpu"), "none")

    small = ["--steps", str(steps), "--batch-size", "2", "--checkpoint-every", "0"]
    lae, dl = tmp_path / "lae.safetensors", tmp_path / "difflora.safetensors"
    assert train("lae", "--dataset", str(dataset), "--out", str(lae), *small, "--patch", str(patch), "--levels", "2",
                 "--channels", "16", "--latent-channels", "2", "--heads", "2", "--mlp-hidden", "16") == 0
    assert train("dit", "--dataset", str(dataset), "--lae", str(lae), "--out", str(dl), *small, "--hidden", "16",
                 "--depth", "1", "--heads", "2") == 0
    return load_difflora(dl)


def test_the_built_dataset_trains_the_lae_and_the_dit(built, tmp_path):
    model = train_difflora(built, tmp_path, steps=3, patch=8)
    pop = load_population(built)
    assert model.meta["embedders"] == pop.entries[0]["embedders"] and model.meta["base_model"] == "sd15"
    lora = model.sample(pop.face[0][:1], pop.image[0][:1], steps=3, seed=0)[0]
    assert set(lora) == set(pop.bundles["id0"].weights)


def test_a_flux_dataset_builds_and_trains_a_difflora_that_samples_flux_loras(data, tmp_path):
    """DiffLoRA on Flux end to end: the builder on the tiny Flux-dev (text encoder from --clip, flux_attn targets),
    then the LAE and the DiT on that population; the sampled LoRA has the Flux layout of the built ones."""
    flux, clip_l = os.environ.get("IDLORA_TINY_FLUX"), os.environ.get("IDLORA_TINY_CLIP_L")
    if not (flux and clip_l):
        pytest.fail("IDLORA_TINY_FLUX / IDLORA_TINY_CLIP_L are not set: run the tests with ./idlora test")
    out = tmp_path / "flux_ds"
    cmd = args(data, out, "--clip", clip_l, "--targets", "flux_attn")
    cmd[cmd.index("--checkpoint") + 1] = flux
    summary(run(cmd, "build, tiny Flux"))
    pop = load_population(out)
    assert len(pop.entries) == len(PHOTOS) and {e["base_model"] for e in pop.entries} == {"flux"}
    names = set(pop.bundles["id0"].weights)
    assert names and all(n.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for n in names)
    model = train_difflora(out, tmp_path, steps=2, patch=64)  # a coarser patch: the Flux layout is long
    assert model.meta["base_model"] == "flux" and model.meta["targets"] == "flux_attn"
    lora = model.sample(pop.face[0][:1], pop.image[0][:1], steps=2, seed=0)[0]
    assert set(lora) == names
    assert all(lora[n].down.shape == pop.bundles["id0"].weights[n].down.shape for n in names)
