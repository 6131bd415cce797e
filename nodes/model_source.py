"""Where a MODEL input came from, recorded so that a background job can rebuild it later.

A background job must not share weights with the prompts ComfyUI keeps running
(they patch and move them in place), and after a restart the graph that started the
job is gone. So the training node records the part of its prompt that produces its
``model`` input (API format), and the job rebuilds the model from it by running those
nodes directly: a model of its own, e.g. Load Checkpoint (+ LoRA loaders) read again.
"""
from __future__ import annotations

import logging

import torch

import nodes as comfy_nodes
from comfy_api.latest import io

log = logging.getLogger(__name__)


class ModelSourceError(ValueError):
    pass


def record(prompt: dict | None, node_id: str | None, input_name: str = "model") -> dict:
    """The sub-graph of ``prompt`` upstream of ``node_id``'s ``input_name``: {"prompt": {...}, "output": [id, i]}."""
    if not prompt or node_id is None or str(node_id) not in prompt:
        raise ModelSourceError("background mode needs the node to run inside a queued prompt (its graph is "
                               "recorded to rebuild the model); run it from a workflow, or use mode 'blocking'")
    link = prompt[str(node_id)]["inputs"].get(input_name)
    if not isinstance(link, list):
        raise ModelSourceError(f"input {input_name!r} of node {node_id} is not linked to a node")
    keep: dict[str, dict] = {}
    todo = [str(link[0])]
    while todo:
        nid = todo.pop()
        if nid in keep:
            continue
        node = prompt[nid]
        keep[nid] = {"class_type": node["class_type"], "inputs": dict(node["inputs"])}
        todo.extend(str(v[0]) for v in node["inputs"].values() if isinstance(v, list))
    return {"prompt": keep, "output": [str(link[0]), int(link[1])]}


@torch.no_grad()
def rebuild(source: dict, cache: dict | None = None):
    """Run the recorded nodes and return the recorded output (a fresh MODEL with weights of its own).

    Sources recorded from one prompt can share ``cache`` (node id -> outputs), so that e.g. the MODEL and the
    VAE of one Load Checkpoint are loaded once."""
    prompt, cache = source["prompt"], ({} if cache is None else cache)

    def evaluate(nid: str) -> tuple:
        if nid not in cache:
            node = prompt[nid]
            cls = comfy_nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
            if cls is None:
                raise ModelSourceError(f"node type {node['class_type']!r} that made this job's model is not "
                                       f"installed any more; install it, or start the job again")
            kwargs = {k: evaluate(str(v[0]))[v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            if isinstance(cls, type) and issubclass(cls, io.ComfyNode):
                cache[nid] = tuple(cls.execute(**kwargs).args)
            else:
                cache[nid] = tuple(getattr(cls(), cls.FUNCTION)(**kwargs))
        return cache[nid]

    nid, index = source["output"]
    log.info("IDLoRA: rebuilding a job's model from %d recorded node(s)", len(prompt))
    return evaluate(nid)[index]
