"""Comparison board: the images of up to six methods side by side, each with its label and its scores."""
from __future__ import annotations

import logging

import numpy as np
import torch

from comfy_api.latest import io

from ..training import board
from .types import MetricsHandle

log = logging.getLogger(__name__)
CATEGORY = "IDLoRA/metrics"
COLUMNS = 6


class ComparisonBoard(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        inputs = []
        for i in range(1, COLUMNS + 1):
            inputs += [
                io.Image.Input(f"image_{i}", optional=True,
                               tooltip=f"Column {i}: one method's images (the first 'per_column' of the batch). "
                                       f"Unconnected columns are left out."),
                io.String.Input(f"label_{i}", default="", optional=True,
                                tooltip=f"Column {i}'s label, e.g. 'LoRA 625 steps' (empty: 'image {i}')."),
                MetricsHandle.Input(f"metrics_{i}", optional=True,
                                    tooltip=f"Column {i}'s scores: the 'metrics' output of IDLoRA Identity "
                                            f"Similarity / CLIP Score / DINO Score on image_{i}. Missing scores "
                                            f"show as n/a, images without a face as 'no face'."),
            ]
        inputs += [
            io.Int.Input("size", default=384, min=64, max=2048, step=32, optional=True,
                         tooltip="Each image is fitted into a square of this many pixels."),
            io.Int.Input("per_column", default=1, min=1, max=8, optional=True,
                         tooltip="Images per column: the first N of each batch, stacked vertically."),
            io.Int.Input("columns", default=0, min=0, max=COLUMNS, optional=True,
                         tooltip="Methods per row (0: all in one row)."),
            io.String.Input("title", default="", optional=True, tooltip="A title above the board (empty: none)."),
        ]
        return io.Schema(
            node_id="IDLoRAComparisonBoard",
            display_name="IDLoRA Comparison Board",
            category=CATEGORY,
            description="Put the images of up to six methods side by side, each with its label and its identity / "
                        "CLIP scores (from the metrics nodes) underneath; also the scores as a text table.",
            inputs=inputs,
            outputs=[io.Image.Output(display_name="board", tooltip="The board as one image."),
                     io.String.Output(display_name="summary", tooltip="The scores as a text table, one row per "
                                                                      "method.")],
        )

    @classmethod
    def execute(cls, size=384, per_column=1, columns=0, title="", **kwargs) -> io.NodeOutput:
        images, labels, metrics = [], [], []
        for i in range(1, COLUMNS + 1):
            image, m = kwargs.get(f"image_{i}"), kwargs.get(f"metrics_{i}")
            label = (kwargs.get(f"label_{i}") or "").strip() or f"image {i}"
            if image is None:
                if m is not None:
                    log.warning("comparison board: metrics_%d is connected but image_%d is not; column %d is left "
                                "out", i, i, i)
                continue
            if m is not None and not isinstance(m, dict):
                raise ValueError(f"metrics_{i} is a {type(m).__name__}, not metrics: connect the 'metrics' output "
                                 f"of an IDLoRA Identity Similarity, CLIP Score or DINO Score node")
            arr = image[:per_column, ..., :3].float().clamp(0, 1).cpu().numpy()
            images.append([(x * 255).round().astype(np.uint8) for x in arr])
            labels.append(label)
            metrics.append(m)
        if not images:
            raise ValueError("no image connected: connect image_1 (and image_2, ... for the other methods)")
        arr = board.comparison_board(images, labels, board.metric_lines(metrics), size=size, columns=columns,
                                     title=title.strip())
        text = board.summary_table(labels, metrics)
        out = torch.from_numpy(arr).float()[None] / 255.0
        return io.NodeOutput(out, text, ui={"text": [text]})


NODES = [ComparisonBoard]
