"""The one JobManager of this ComfyUI process, wired to its websocket and folders.

Device policy (a lease): a background job trains a model of its own, rebuilt from the
recorded loader nodes (nodes/model_source.py) and patched onto the device outside
ComfyUI's list of loaded models. A generation prompt therefore cannot evict or
re-patch the job's weights in the middle of a step, and ComfyUI, which reads free
device memory from the driver, plans its own loads around the memory the job holds
(on a small GPU it falls back to partial loading instead of running out of memory).
The lease ends with the job: its model is dropped and the cache emptied. The cost
is one more copy of the U-Net in device memory while a job runs; a LoRA job with
stream_blocks keeps its blocks in CPU memory instead and copies two at a time to the
device (training.lora_trainer.BlockStream), so it adds a fraction of a model there.
"""
from __future__ import annotations

import logging
import os
import threading

import comfy.model_management
import folder_paths

from ..training.difflora_job import DiffLoraTask, LaeTask
from ..training.duolora_job import MergeTask
from ..training.idstyle import IdentityStyleTask, Resources
from ..training.fileio import remove_stale_temps
from ..training.jobs import JobManager
from ..training.lora_format import sanitize_save_name
from ..training.lora_dataset import LoraDatasetTask
from ..training.lora_job import LoraJobTask
from ..training.meta_lora_job import MetaPersonalizeTask, MetaStage1Task
from . import model_source
from .comfy_adapter import ComfyDiffusion

log = logging.getLogger(__name__)
_manager: JobManager | None = None
_lock = threading.Lock()
CHECKPOINT_EVERY = int(os.environ.get("IDLORA_CHECKPOINT_EVERY", "50"))
FULL_GC_INTERVAL_S = float(os.environ.get("IDLORA_FULL_GC_INTERVAL_S", "10"))


def jobs_root() -> str:
    return os.path.join(folder_paths.get_user_directory(), "idlora", "jobs")


def send_event(name: str, payload: dict) -> None:
    from server import PromptServer  # thread-safe: send_sync hands the message to the event loop
    if getattr(PromptServer, "instance", None) is not None:
        PromptServer.instance.send_sync(name, payload)


def load_private_model(source: dict, stream_blocks: bool = False) -> ComfyDiffusion:
    """The job's own model, rebuilt from its recorded nodes; ``stream_blocks``: its blocks stay in CPU memory."""
    return ComfyDiffusion(model_source.rebuild(source), load="private", stream_blocks=stream_blocks)


def load_identity_resources(sources: dict) -> Resources:
    """The model (with its VAE, for decoding x0) and the identity backbone of an identity-stylization job,
    rebuilt from the nodes recorded at submit, sharing one cache (one checkpoint load for MODEL and VAE)."""
    cache: dict = {}
    model = model_source.rebuild(sources["model"], cache)
    vae = model_source.rebuild(sources["vae"], cache)
    embed = None
    if sources.get("embedder"):
        from .idstyle_nodes import embed_fn
        embed = embed_fn(model_source.rebuild(sources["embedder"], cache))
    return Resources(ComfyDiffusion(model, vae=vae, load="private"), embed)


def claim_output(name: str, folder: str, suffixes: tuple[str, ...] = ("",)) -> tuple[str, list[str]]:
    """The output name of a new job: ``name`` (sanitised), or ``name_0001``, ``name_0002``, ... when a file of
    that name already exists in ``folder`` or belongs to another job, so that no job replaces another's file.
    Returns (stem, the paths <folder>/<stem><suffix>.safetensors), reserved for the job."""
    stem = sanitize_save_name(name)[:-len(".safetensors")]

    def files(n: str) -> list[str]:
        return [os.path.join(folder, f"{n}{s}.safetensors") for s in suffixes]
    stem = manager().claim_name(stem, files)
    return stem, files(stem)


def output_folders() -> list[str]:
    """The folders IDLoRA writes model files to (cleaned of interrupted writes at start-up)."""
    loras = folder_paths.get_folder_paths("loras")
    models = folder_paths.models_dir
    return ([os.path.join(loras[0], "idlora")] if loras else []) + [
        os.path.join(models, "idlora"), os.path.join(models, "difflora")]


def torch_device() -> str:
    """ComfyUI's torch device, where the DiffLoRA jobs train (they hold no MODEL)."""
    return str(comfy.model_management.get_torch_device())


def manager() -> JobManager:
    global _manager
    with _lock:
        if _manager is None:
            _manager = JobManager(jobs_root(), events=send_event, checkpoint_every=CHECKPOINT_EVERY,
                                  on_job_end=comfy.model_management.soft_empty_cache,
                                  full_gc_interval_s=FULL_GC_INTERVAL_S)
            device = torch_device()  # the DiffLoRA jobs hold no MODEL: they train on ComfyUI's torch device
            for task_cls, resource in ((LoraJobTask, load_private_model), (MetaStage1Task, load_private_model),
                                       (MetaPersonalizeTask, load_private_model), (MergeTask, load_private_model),
                                       (IdentityStyleTask, load_identity_resources),
                                       (LoraDatasetTask, load_private_model), (LaeTask, device),
                                       (DiffLoraTask, device)):
                _manager.register_task(task_cls, resource)
            for folder in output_folders():
                remove_stale_temps(folder)
            for bad in _manager.unreadable:
                log.warning("IDLoRA: the job folder %s cannot be read and is not listed (%s); move it away or "
                            "delete it", bad["folder"], bad["error"])
            interrupted = [j.id for j in _manager.list() if j.status.state.value == "interrupted"]
            if interrupted:
                log.info("IDLoRA: %d interrupted job(s) can be resumed: %s", len(interrupted), interrupted)
        return _manager
