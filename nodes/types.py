"""Wire types shared by IDLoRA's nodes."""
from __future__ import annotations

from comfy_api.latest import io

LoraHandle = io.Custom("IDLORA_LORA")  # a training.lora_format.LoraBundle
JobHandle = io.Custom("IDLORA_JOB")    # a job id (str) of nodes.job_service.manager()


class _LinksToCombo(str):
    """A 'COMBO' output type that ComfyUI's validator accepts on any combo input.

    ComfyUI compares link types with ``!=`` and honours types whose ``__ne__`` says
    they match ("pre-union" rule in comfy_execution/validation.py). It lets the LoRA
    file name written by IDLoRA Save LoRA feed the stock LoraLoader's lora_name in the
    same queue run, before the file exists at validation time.
    """

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = str.__hash__


class LoraNameOutput(io.Output):
    """An output carrying a file name under models/loras, linkable to the stock LoraLoader."""

    @property
    def io_type(self):
        return _LinksToCombo("COMBO")


FaceEmbedderHandle = io.Custom("IDLORA_FACE_EMBEDDER")  # a training.evaluate.FaceEmbedderHandle
MetricsHandle = io.Custom("IDLORA_METRICS")  # dict: metric name -> training.metrics.MetricResult.as_dict()
MetaDownHandle = io.Custom("IDLORA_META_DOWN")  # {"weights", "meta", "path", "name"} of a Meta-Down file
DiffLoraHandle = io.Custom("IDLORA_DIFFLORA")  # a training.difflora.DiffLora (LAE + DiT + layout) on the torch device
