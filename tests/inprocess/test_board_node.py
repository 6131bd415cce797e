"""IDLoRA Comparison Board called in-process (ComfyUI imported, no server): schema (every input has a tooltip),
columns from the connected images only, the board image and the text table."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def bn(comfy):
    from idlora.nodes import board_nodes
    return board_nodes


def test_schema_names_and_tooltips(bn):
    schema = bn.ComparisonBoard.define_schema()
    assert schema.node_id == "IDLoRAComparisonBoard"
    names = [i.id for i in schema.inputs]
    assert names[:3] == ["image_1", "label_1", "metrics_1"] and names[-4:] == ["size", "per_column", "columns",
                                                                              "title"]
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    assert [o.display_name for o in schema.outputs] == ["board", "summary"]


def test_board_from_connected_columns(bn):
    face = {"FaceSim": {"name": "FaceSim", "mean": 0.5, "values": [0.5], "count": 1, "no_face": 0, "detail": {}}}
    out = bn.ComparisonBoard.execute(size=64, image_1=torch.rand(2, 48, 32, 3), label_1="LoRA", metrics_1=face,
                                     image_3=torch.rand(1, 32, 32, 3), metrics_2=face)
    board, text = out.args
    assert board.shape == (1, 8 + 64 + 8 + 8 + 22 * 2 + 8, 2 * (64 + 16), 3) and board.dtype == torch.float32
    assert text.splitlines()[1].startswith("LoRA") and "image 3" in text and "n/a" in text
    one = bn.ComparisonBoard.execute(size=64, image_1=torch.rand(2, 48, 32, 3)).args[0]
    two = bn.ComparisonBoard.execute(size=64, per_column=2, image_1=torch.rand(2, 48, 32, 3)).args[0]
    assert two.shape[1] == one.shape[1] + 64 + 8 and two.shape[2] == 64 + 16
    with pytest.raises(ValueError, match="connect image_1"):
        bn.ComparisonBoard.execute(metrics_1=face)
    with pytest.raises(ValueError, match="metrics_1 is a str"):
        bn.ComparisonBoard.execute(image_1=torch.rand(1, 8, 8, 3), metrics_1="x")
