"""Nodes around background jobs: wait for one, look at one, cancel one."""
from __future__ import annotations

import json

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..training.jobs import JobState
from ..training.lora_format import load_lora
from .inputs import JobNode
from .job_service import manager
from .types import JobHandle, LoraHandle, LoraNameOutput

CATEGORY = "IDLoRA/jobs"
_JOB_TIP = "A job id, from a training node in background mode."
WHICH = {"main": "", "content": "content_", "style": "style_", "meta_down": "meta_down_", "dataset": "",
         "lae": "", "difflora": ""}  # -> the result keys <prefix>path / <prefix>lora
# jobs whose product is not a LoRA: ``which`` is the result key of its name (Load Meta-Down's / Load DiffLoRA's
# file name, or the LoRA dataset folder of IDLoRA Build LoRA Dataset)
NAMED = ("meta_down", "dataset", "lae", "difflora")


def _job_id(job: str) -> str:
    if not job:
        raise ValueError("job is empty: connect the 'job' output of a training node set to mode 'background' "
                         "(IDLoRA Build LoRA Dataset gives an empty job when every identity is already built: then "
                         "there is nothing to wait for)")
    return job


def wait_for_job(job: str):
    """Block until the job ends, with a progress bar; its status when it succeeded, else RuntimeError. ComfyUI's
    Cancel ends the waiting only."""
    m = manager()
    j = m.get(_job_id(job))
    bar = comfy.utils.ProgressBar(max(j.status.total, 1))
    while not j.done.wait(0.25):
        bar.update_absolute(j.status.step, max(j.status.total, 1))
        comfy.model_management.throw_exception_if_processing_interrupted()  # ends the wait only
    st = j.status
    if st.state != JobState.SUCCEEDED:
        raise RuntimeError(f"job {job} ({st.name}) ended {st.state.value}" + (f": {st.error}" if st.error else "")
                           + f". Resume it with POST /idlora/jobs/{job}/resume or the IDLoRA jobs panel")
    bar.update_absolute(st.total, max(st.total, 1))
    return st


class WaitForJob(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRAWaitForJob",
            display_name="IDLoRA Wait for Job",
            category=CATEGORY,
            description="Block until a background job ends and return its LoRA. ComfyUI's Cancel stops the "
                        "waiting, not the job.",
            inputs=[JobHandle.Input("job", tooltip=_JOB_TIP),
                    io.Combo.Input("which", options=list(WHICH), default="main", optional=True,
                                   tooltip="Which LoRA of the job: main (the plain trainer's LoRA, the style LoRA "
                                           "of an identity-stylization job), content / style of an "
                                           "identity-stylization job, or meta_down of a Meta-LoRA stage-1 job "
                                           "(then 'lora' is empty and 'lora_name' is the Meta-Down file, for "
                                           "IDLoRA Load Meta-Down). dataset / lae / difflora: the LoRA dataset "
                                           "folder, LAE file or DiffLoRA file (for IDLoRA Load DiffLoRA) of a "
                                           "DiffLoRA job; 'lora' is empty then.")],
            outputs=[LoraHandle.Output(display_name="lora", tooltip="The job's LoRA, read from its file."),
                     LoraNameOutput(display_name="lora_name", tooltip="The LoRA file under models/loras (for the "
                                                                     "stock LoraLoader)."),
                     io.LossMap.Output(display_name="loss", tooltip="The job's loss history.")],
        )

    @classmethod
    def execute(cls, job: str, which: str = "main") -> io.NodeOutput:
        st = wait_for_job(job)
        prefix = WHICH[which]
        losses = [r["loss"] for r in manager().losses(job)]
        if which in NAMED:  # not a LoRA: its name feeds a loader node (or the next DiffLoRA node)
            if which not in st.result:
                raise ValueError(f"job {job} ({st.kind}) has no {which} (its results: {sorted(st.result)}); set "
                                 f"'which' to what the job makes")
            return io.NodeOutput(None, st.result[which], {"loss": losses})
        if f"{prefix}path" not in st.result:
            raise ValueError(f"job {job} ({st.kind}) has no {which} LoRA (its results: {sorted(st.result)}); "
                             f"set 'which' to main")
        return io.NodeOutput(load_lora(st.result[f"{prefix}path"]), st.result[f"{prefix}lora"], {"loss": losses})


class JobStatusNode(JobNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRAJobStatus",
            display_name="IDLoRA Job Status",
            category=CATEGORY,
            description="The state and progress of a background job, at the moment the node runs.",
            is_output_node=True,
            inputs=[JobHandle.Input("job", tooltip=_JOB_TIP)],
            outputs=[io.String.Output(display_name="state", tooltip="queued, running, succeeded, failed, "
                                                                    "cancelled or interrupted"),
                     io.Float.Output(display_name="progress", tooltip="Fraction of steps done, 0 to 1."),
                     io.String.Output(display_name="status_json", tooltip="The whole status as JSON.")],
        )

    @classmethod
    def execute(cls, job: str) -> io.NodeOutput:
        st = manager().get(_job_id(job)).status
        progress = st.step / st.total if st.total else 0.0
        text = f"{st.name}: {st.state.value} {st.step}/{st.total}" + (f" ({st.error})" if st.error else "")
        return io.NodeOutput(st.state.value, progress, json.dumps(st.to_json()), ui={"text": [text]})


class CancelJob(JobNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IDLoRACancelJob",
            display_name="IDLoRA Cancel Job",
            category=CATEGORY,
            description="Cancel a queued or running job. A running job saves a checkpoint and can be resumed.",
            is_output_node=True,
            inputs=[JobHandle.Input("job", tooltip=_JOB_TIP)],
            outputs=[io.String.Output(display_name="state", tooltip="The job's state after the request.")],
        )

    @classmethod
    def execute(cls, job: str) -> io.NodeOutput:
        j = manager().cancel(_job_id(job))
        return io.NodeOutput(j.status.state.value, ui={"text": [f"{job}: cancel requested"]})


NODES = [WaitForJob, JobStatusNode, CancelJob]
