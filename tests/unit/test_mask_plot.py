"""The DuoLoRA Figure-4 style mask plot: the table's counts, the image's size and content, and that the bars
follow the ranks (content-dominant layers with larger content ranks put the content bars at larger ranks)."""
from __future__ import annotations

import numpy as np
import pytest

from idlora.training.mask_plot import (CONTENT_COLOR, STYLE_COLOR, mask_plot_layout, mask_rank_summary,
                                       mask_rank_table, render_mask_ranks)


def hand_made():
    masks = {
        "output_blocks.0.1.transformer_blocks.0.attn1.to_q": {"c": [1.0, 0.9, -0.8, 0.5, 0.0], "s": [0.2, 1.0, 0.0]},
        "input_blocks.4.1.transformer_blocks.0.attn2.to_k": {"c": [0.1, 0.6], "s": [1.0, 1.0, 0.7, -0.51]},
        "middle_block.1.transformer_blocks.0.attn1.to_out.0": {"c": [1.0, 1.0], "s": [0.0, 0.0]},
        "input_blocks.10.1.proj_in": {"c": [0.4], "s": [0.6]},
        "time_embed.0": {"c": [0.5], "s": [0.50001]},
    }
    kinds = {"output_blocks.0.1.transformer_blocks.0.attn1.to_q": "content",
             "input_blocks.4.1.transformer_blocks.0.attn2.to_k": ("style", (64, 64)),  # LoraMerger.layer_kinds form
             "middle_block.1.transformer_blocks.0.attn1.to_out.0": "content"}
    return masks, kinds


def test_table_counts_kinds_and_unet_order():
    masks, kinds = hand_made()
    rows = mask_rank_table(masks, kinds, threshold=0.5)
    assert [r["name"] for r in rows] == ["time_embed.0", "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
                                         "input_blocks.10.1.proj_in",  # 10 after 4: numbers compare as numbers
                                         "middle_block.1.transformer_blocks.0.attn1.to_out.0",
                                         "output_blocks.0.1.transformer_blocks.0.attn1.to_q"]
    by = {r["name"]: r for r in rows}
    q = by["output_blocks.0.1.transformer_blocks.0.attn1.to_q"]
    # 0.5 itself is not active (|m| > threshold)
    assert (q["kind"], q["rank_c"], q["rank_s"], q["active_c"], q["active_s"]) == ("content", 5, 3, 3, 1)
    assert q["mean_c"] == pytest.approx(0.32) and q["mean_s"] == pytest.approx(0.4)
    k = by["input_blocks.4.1.transformer_blocks.0.attn2.to_k"]
    assert (k["kind"], k["active_c"], k["active_s"]) == ("style", 1, 4)  # |-0.51| > 0.5 is active
    t = by["time_embed.0"]
    assert (t["kind"], t["active_c"], t["active_s"]) == ("other", 0, 1)  # not in kinds: other
    assert by["middle_block.1.transformer_blocks.0.attn1.to_out.0"]["active_s"] == 0
    # another threshold, other counts
    assert {r["name"]: r["active_c"] for r in mask_rank_table(masks, kinds, threshold=0.0)}[q["name"]] == 4
    text = mask_rank_summary(masks, kinds, 0.5)
    assert "content: 2 layers, mean active rank m_c 2.50 vs m_s 0.50; m_c larger in 2" in text
    assert "style: 1 layers" in text and "m_s larger in 1" in text


def test_bad_inputs_are_named():
    masks, kinds = hand_made()
    with pytest.raises(ValueError, match="no masks to plot"):
        mask_rank_table({}, {})
    with pytest.raises(ValueError, match="no masks to plot"):
        render_mask_ranks({}, {})
    with pytest.raises(ValueError, match=r"only the mean of its content mask"):
        mask_rank_table({"a.to_q": {"c_mean": 0.4, "s_mean": 0.6}}, {})  # ZipLoRA file metadata
    with pytest.raises(ValueError, match=r"layer 'a.to_q': the style mask is empty"):
        mask_rank_table({"a.to_q": {"c": [1.0], "s": []}}, {})
    with pytest.raises(ValueError, match=r"non-finite"):
        mask_rank_table({"a.to_q": {"c": [float("nan")], "s": [1.0]}}, {})
    with pytest.raises(ValueError, match=r"layer kind 'texture' is unknown"):
        mask_rank_table(masks, {**kinds, "time_embed.0": "texture"})
    with pytest.raises(ValueError, match=r"threshold = -1"):
        mask_rank_table(masks, kinds, threshold=-1)
    with pytest.raises(ValueError, match=r"at least 360x240"):
        render_mask_ranks(masks, kinds, width=100, height=100)
    with pytest.raises(ValueError, match=r"method = 'zip'"):
        render_mask_ranks(masks, kinds, method="zip")


def figure4_like(n_content: int = 12, n_style: int = 6, rank: int = 16, seed: int = 0):
    """Content-dominant layers: m_c has 12 of 16 active, m_s 4; style-dominant layers the reverse."""
    rng = np.random.default_rng(seed)
    masks, kinds = {}, {}

    def mask(active: int) -> list[float]:
        m = np.zeros(rank)
        m[rng.permutation(rank)[:active]] = rng.uniform(0.8, 1.2, active)
        return m.tolist()
    for i in range(n_style):
        n = f"input_blocks.4.1.transformer_blocks.0.attn{1 + i % 2}.to_{'qkv'[i % 3]}{i}"
        masks[n], kinds[n] = {"c": mask(4), "s": mask(12)}, "style"
    for i in range(n_content):
        n = f"middle_block.1.transformer_blocks.{i}.attn1.to_q"
        masks[n], kinds[n] = {"c": mask(12), "s": mask(4)}, "content"
    return masks, kinds


def _colour_mask(img: np.ndarray, colour) -> np.ndarray:
    return (img == np.array(colour, dtype=np.uint8)).all(axis=-1)


def _mean_x(img, box, colour) -> float:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    ys, xs = np.nonzero(_colour_mask(img[y0:y1 + 1, x0:x1 + 1], colour))
    assert xs.size, f"no bars of colour {colour} in {box}"
    return float(xs.mean())


@pytest.mark.parametrize("size", [(960, 640), (480, 300)])
def test_image_size_not_blank_and_bars_follow_the_ranks(size):
    masks, kinds = figure4_like()
    w, h = size
    img = render_mask_ranks(masks, kinds, threshold=0.5, width=w, height=h)
    assert img.shape == (h, w, 3) and img.dtype == np.uint8
    assert (img != 255).any(axis=-1).mean() > 0.05          # not blank
    assert _colour_mask(img, CONTENT_COLOR).any() and _colour_mask(img, STYLE_COLOR).any()
    box = mask_plot_layout(w, h)
    # histograms: in the content panel the content bars sit at larger active ranks (further right), in the
    # style panel the style bars do
    assert _mean_x(img, box["content"], CONTENT_COLOR) > _mean_x(img, box["content"], STYLE_COLOR) + 5
    assert _mean_x(img, box["style"], STYLE_COLOR) > _mean_x(img, box["style"], CONTENT_COLOR) + 5
    # per-layer strip, U-Net order: 6 style layers (input block 4) first, then the 12 content ones (middle block);
    # content bars go up from the middle line, style bars down: compare the bars' heights per column
    x0, y0, x1, y1 = (int(round(v)) for v in box["strip"])
    strip = img[y0:y1 + 1, x0:x1 + 1]
    up = _colour_mask(strip, CONTENT_COLOR).sum(axis=0)
    down = _colour_mask(strip, STYLE_COLOR).sum(axis=0)
    split = strip.shape[1] * 6 // 18
    style_cols, content_cols = slice(2, split - 2), slice(split + 2, strip.shape[1] - 2)
    assert up[content_cols].mean() > 2 * down[content_cols].mean() > 0
    assert down[style_cols].mean() > 2 * up[style_cols].mean() > 0
    assert up[content_cols].mean() == pytest.approx(down[style_cols].mean(), rel=0.1)  # both 12 of 16


def test_swapped_ranks_swap_the_bars():
    masks, kinds = figure4_like()
    swapped = {n: {"c": m["s"], "s": m["c"]} for n, m in masks.items()}
    img = render_mask_ranks(swapped, kinds)
    box = mask_plot_layout(960, 640)
    assert _mean_x(img, box["content"], STYLE_COLOR) > _mean_x(img, box["content"], CONTENT_COLOR) + 5


def test_ziplora_output_masks_and_one_kind_only():
    rng = np.random.default_rng(1)
    # ZipLoRA: one number per output unit (640 / 1280 wide layers); "rank" is the count of active output units
    masks = {f"output_blocks.{i}.1.transformer_blocks.0.attn1.to_q": {"c": rng.uniform(0, 1, d).tolist(),
                                                                     "s": rng.uniform(0, 1, d).tolist()}
             for i, d in ((0, 1280), (1, 1280), (3, 640))}
    rows = mask_rank_table(masks, {}, threshold=0.5)
    assert [r["rank_c"] for r in rows] == [1280, 1280, 640]
    assert all(abs(r["active_c"] - r["rank_c"] / 2) < 0.1 * r["rank_c"] for r in rows)
    img = render_mask_ranks(masks, {n: "content" for n in masks}, method="ziplora")  # no style-dominant layers
    assert img.shape == (640, 960, 3) and _colour_mask(img, CONTENT_COLOR).any()
    assert "active output units" in mask_rank_summary(masks, {}, method="ziplora")
