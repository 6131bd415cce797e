"""Meta-LoRA stage-1 inputs (training/meta_lora_data.py): identity folders and their errors, IMAGE batch + labels,
image loading (centre crop, size), and encoding into an IdentitySet on a tiny pure-torch model."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from idlora.training.meta_lora import identity_prompts
from idlora.training.meta_lora_data import (concat_conds, encode_identity_set, labels_to_identities, load_images,
                                            scan_identity_folder)
from tiny_torch import TinyDiffusion, images


def save(path, colour=(255, 0, 0), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# -- folders ---------------------------------------------------------------------------------------------

def test_scan_lists_identities_and_their_images_sorted(tmp_path):
    save(tmp_path / "bob" / "b.PNG")
    save(tmp_path / "bob" / "a.jpg")
    save(tmp_path / "alice" / "2.webp")
    save(tmp_path / "alice" / "1.jpeg")
    save(tmp_path / "alice" / "3.bmp")
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    save(tmp_path / "alice" / ".hidden.png")
    save(tmp_path / ".cache" / "x.png")          # a hidden folder is not an identity
    save(tmp_path / "loose.png")                 # files directly in the root are not identities
    (tmp_path / "alice" / "sub").mkdir()         # nor are nested folders images
    got = scan_identity_folder(tmp_path)
    assert [(n, [p.name for p in ps]) for n, ps in got] == [("alice", ["1.jpeg", "2.webp", "3.bmp"]),
                                                            ("bob", ["a.jpg", "b.PNG"])]


def test_scan_missing_root_names_it_and_the_layout(tmp_path):
    with pytest.raises(ValueError, match=r"nope does not exist.*one subfolder per identity"):
        scan_identity_folder(tmp_path / "nope")


def test_scan_root_that_is_a_file(tmp_path):
    f = save(tmp_path / "one.png")
    with pytest.raises(ValueError, match=r"one\.png is a file, not a folder"):
        scan_identity_folder(f)


def test_scan_without_identity_folders_says_how_to_lay_out(tmp_path):
    with pytest.raises(ValueError, match=r"no identity subfolders: put each identity's images in a subfolder"):
        scan_identity_folder(tmp_path)
    save(tmp_path / "a.jpg")
    save(tmp_path / "b.jpg")
    with pytest.raises(ValueError, match=r"2 images lie directly in it"):
        scan_identity_folder(tmp_path)


def test_scan_empty_identity_folder_is_named(tmp_path):
    save(tmp_path / "alice" / "1.png")
    (tmp_path / "bob").mkdir()
    (tmp_path / "bob" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"bob \(identity 'bob'\) has no images: every identity folder needs at "
                                         r"least one image"):
        scan_identity_folder(tmp_path)


def test_scan_one_identity_is_allowed_with_a_warning(tmp_path, caplog):
    save(tmp_path / "alice" / "1.png")
    with caplog.at_level(logging.WARNING, logger="idlora.training.meta_lora_data"):
        got = scan_identity_folder(tmp_path)
    assert [n for n, _ in got] == ["alice"]
    assert "only 1 identity" in caplog.text


# -- images -------------------------------------------------------------------------------------------

def test_load_images_centre_crops_resizes_and_scales(tmp_path):
    # 60x20: red | green | blue thirds; the centre square is the green third
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, :20, 0], a[:, 20:40, 1], a[:, 40:, 2] = 255, 255, 255
    Image.fromarray(a).save(tmp_path / "wide.png")
    b = np.zeros((50, 10, 3), np.uint8)  # tall: white band in the middle 10 rows
    b[20:30] = 255
    Image.fromarray(b).save(tmp_path / "tall.png")
    out = load_images([tmp_path / "wide.png", tmp_path / "tall.png"], 16)
    assert out.shape == (2, 16, 16, 3) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    wide = out[0][2:-2, 2:-2]  # away from the resampling border
    assert torch.allclose(wide[..., 1], torch.ones(()), atol=0.02) and wide[..., [0, 2]].max() < 0.02
    assert torch.allclose(out[1][2:-2, 2:-2], torch.ones(()), atol=0.02)


def test_load_images_same_size_keeps_pixels(tmp_path):
    a = (np.arange(8 * 8 * 3).reshape(8, 8, 3) % 256).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "x.png")
    out = load_images([tmp_path / "x.png"], 8)
    assert torch.equal(out[0], torch.from_numpy(a.astype(np.float32) / 255.0))


def test_load_images_unreadable_file_is_named(tmp_path):
    save(tmp_path / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read the image .*broken\.jpg"):
        load_images([tmp_path / "ok.png", tmp_path / "broken.jpg"], 8)


# -- labels -------------------------------------------------------------------------------------------

def test_labels_newlines_and_commas_group_in_first_appearance_order():
    imgs = torch.arange(5).float().reshape(5, 1, 1, 1).expand(5, 2, 2, 3)
    got = labels_to_identities(imgs, " bob, alice\n bob\n\ncarol ,alice, ")
    assert [n for n, _ in got] == ["bob", "alice", "carol"]
    assert [t[:, 0, 0, 0].tolist() for _, t in got] == [[0.0, 2.0], [1.0, 4.0], [3.0]]


def test_labels_count_mismatch_names_both_counts():
    with pytest.raises(ValueError, match=r"labels has 2 labels but images has 3 images"):
        labels_to_identities(torch.zeros(3, 4, 4, 3), "a\nb")
    with pytest.raises(ValueError, match=r"labels has 0 labels but images has 1 images"):
        labels_to_identities(torch.zeros(1, 4, 4, 3), " , \n")


def test_labels_need_an_image_batch():
    with pytest.raises(ValueError, match=r"non-empty IMAGE batch"):
        labels_to_identities(torch.zeros(0, 4, 4, 3), "")


# -- encoding -------------------------------------------------------------------------------------------

def test_encode_identity_set_latents_owner_and_prompt_rows():
    model = TinyDiffusion(seed=0)
    ids = [("a", images(2, 32, seed=1)), ("b", images(3, 32, seed=2)), ("c", images(1, 32, seed=3))]
    data = encode_identity_set(model, ids, "person", seed=5)
    assert data.names == ["a", "b", "c"]
    assert data.owner.tolist() == [0, 0, 1, 1, 1, 2]
    assert data.latents.shape == (6, 4, 4, 4)
    assert torch.allclose(data.latents[2:5], model.encode_images(ids[1][1]))
    prompts = identity_prompts("person", 6, seed=5)
    assert all("sks person" in p for p in prompts)
    assert torch.equal(data.cond["context"], model.encode_prompts(prompts, 32, 32)["context"])


def test_encode_identity_set_errors():
    model = TinyDiffusion(seed=0)
    with pytest.raises(ValueError, match=r"different sizes"):
        encode_identity_set(model, [("a", images(1, 32)), ("b", images(1, 16))], "person", 0)
    with pytest.raises(ValueError, match=r"\['a'\] appear more than once"):
        encode_identity_set(model, [("a", images(1, 32)), ("a", images(1, 32))], "person", 0)
    with pytest.raises(ValueError, match=r"\['b'\] have no images"):
        encode_identity_set(model, [("a", images(1, 32)), ("b", images(0, 32))], "person", 0)
    with pytest.raises(ValueError, match=r"no identities"):
        encode_identity_set(model, [], "person", 0)


def test_encode_pads_context_of_different_token_lengths():
    class LongPrompts(TinyDiffusion):
        """A text encoder that gives 'close-up' prompts two 8-token chunks."""
        def encode_prompts(self, prompts, width, height):
            out = super().encode_prompts(prompts, width, height)
            if "close-up" in prompts[0]:
                out["context"] = torch.cat([out["context"], out["context"] + 1], 1)
            return out

    model = LongPrompts(seed=0)
    prompts = identity_prompts("person", 6, seed=0)
    assert any("close-up" in p for p in prompts) and not all("close-up" in p for p in prompts)
    data = encode_identity_set(model, [("a", images(3, 32, seed=1)), ("b", images(3, 32, seed=2))], "person", 0)
    ctx = data.cond["context"]
    assert ctx.shape == (6, 16, 16)
    for i, p in enumerate(prompts):
        one = model.encode_prompts([p], 32, 32)["context"][0]
        assert torch.equal(ctx[i], one if one.shape[0] == 16 else torch.cat([one, one]))


def test_concat_conds_repeats_chunks_up_to_the_longest():
    a, b = torch.randn(1, 4, 2), torch.randn(2, 10, 2)
    out = concat_conds([{"context": a, "y": torch.zeros(1, 3)}, {"context": b, "y": torch.ones(2, 3)}])
    assert out["context"].shape == (3, 10, 2) and out["y"].shape == (3, 3)
    assert torch.equal(out["context"][0], torch.cat([a[0], a[0], a[0, :2]]))
    assert torch.equal(out["context"][1:], b)
