"""The comparison board's layout (pure numpy / PIL): size, labels and scores drawn under each image, missing scores
shown as n/a, faceless images as 'no face', and the text table."""
from __future__ import annotations

import numpy as np
import pytest

from idlora.training.board import comparison_board, metric_lines, metric_value, summary_table


def _img(v, h=40, w=60):
    return np.full((h, w, 3), v, np.uint8)


FACESIM = {"FaceSim": {"name": "FaceSim", "mean": 0.61234, "values": [0.6], "count": 1, "no_face": 0, "detail": {}}}
NOFACE = {"FaceSim": {"name": "FaceSim", "mean": None, "values": [], "count": 0, "no_face": 2, "detail": {}},
          "CLIP-T": {"name": "CLIP-T", "mean": 0.25, "values": [0.25], "count": 1, "no_face": 0, "detail": {}}}


def test_metric_lines_line_up_and_say_what_is_missing():
    lines = metric_lines([FACESIM, None, NOFACE])
    assert lines == [["FaceSim: 0.6123", "CLIP-T: n/a"], ["FaceSim: n/a", "CLIP-T: n/a"],
                     ["FaceSim: no face", "CLIP-T: 0.2500"]]
    assert metric_value(dict(FACESIM["FaceSim"], no_face=1)) == "0.6123 (1 no face)"
    assert metric_lines([None, None]) == [[], []]
    table = summary_table(["LoRA", "Meta-LoRA", "DiffLoRA"], [FACESIM, None, NOFACE]).splitlines()
    assert table[0].split(" | ")[0].strip() == "method" and "CLIP-T" in table[0]
    assert "no face" in table[3] and table[2].count("n/a") == 2


def test_board_shape_and_text_under_each_image():
    size = 64
    plain = comparison_board([_img(200), _img(30)], ["", ""], size=size)
    board = comparison_board([_img(200), _img(30)], ["method A", "method B"], metric_lines([FACESIM, None]),
                             size=size)
    assert board.dtype == np.uint8 and board.ndim == 3 and board.shape[2] == 3
    assert board.shape[1] == plain.shape[1] == 2 * (size + 16)
    assert board.shape[0] > plain.shape[0]                     # two metric lines more
    cell = size + 16
    img_bottom = 8 + size
    # the images are pasted, fitted into the square (60x40 -> 64 wide)
    assert (board[8 + size // 2, 8 + size // 2] == 200).all() and (board[8 + size // 2, cell + 8 + size // 2] == 30).all()
    # text below the image: dark pixels in each column's text band, where the unlabelled board is white
    text = board[img_bottom + 8:, :]
    for c in range(2):
        band = text[:, c * cell:(c + 1) * cell]
        assert (band < 128).any(), f"no text under column {c}"
    assert (plain[img_bottom + 8:] >= 200).all()                # only the column separator
    # column 2 has no metrics: its lines are grey 'n/a', drawn but lighter than column 1's values
    lines = text[16 + 6:]                                      # below the label line (font 16 + 6)
    a, b = lines[:, 1:cell], lines[:, cell + 1:2 * cell]
    assert (b < 200).any() and a.min() < 100 <= b.min()


def test_board_rows_stacks_title_and_errors():
    size = 32
    one_row = comparison_board([_img(10)] * 3, ["a", "b", "c"], size=size)
    two_rows = comparison_board([_img(10)] * 3, ["a", "b", "c"], size=size, columns=2)
    assert two_rows.shape[1] == 2 * (size + 16) and two_rows.shape[0] == 2 * one_row.shape[0]
    stacked = comparison_board([[_img(10), _img(90)], _img(10)], ["a", "b"], size=size)
    assert stacked.shape[0] == one_row.shape[0] + size + 8
    titled = comparison_board([_img(10)], ["a"], size=size, title="pipeline comparison")
    assert titled.shape[0] > comparison_board([_img(10)], ["a"], size=size).shape[0]
    float_img = comparison_board([np.full((8, 8, 3), 0.5, np.float32)], ["f"], size=size)
    assert (float_img[8 + size // 2, 8 + size // 2] == 128).all()
    long = comparison_board([_img(10)], ["a very long label that cannot fit in thirty-two pixels"], size=size)
    assert long.shape[1] == size + 16
    with pytest.raises(ValueError, match="connect at least image_1"):
        comparison_board([], [])
    with pytest.raises(ValueError, match="1 labels for 2 image columns"):
        comparison_board([_img(1), _img(2)], ["a"])
    with pytest.raises(ValueError, match=r"must be \(H, W, 3\)"):
        comparison_board([np.zeros((4, 4))], ["a"])
