"""Schema pieces and caching rules that several IDLoRA nodes share: the same ids, types, ranges and tooltips."""
from __future__ import annotations

from comfy_api.latest import io

SEED_TIP = "Seed of the whole run."
ENCODE_PROMPTS_TIP = "Encodes the identity prompts once."
ENCODE_IMAGES_TIP = "Encodes the images once."


def seed_input(default: int = 0, tooltip: str = SEED_TIP, **kwargs) -> io.Int.Input:
    """The ``seed`` input: an int from 0 to 2**31 - 1."""
    return io.Int.Input("seed", default=default, min=0, max=2**31 - 1, tooltip=tooltip, **kwargs)


def diffusion_inputs(model: str, clip: str = ENCODE_PROMPTS_TIP, vae: str = ENCODE_IMAGES_TIP,
                     clip_optional: bool = False) -> list:
    """The ``model``, ``clip`` and ``vae`` inputs of a node that trains on the model, with their tooltips
    (``clip_optional``: the node also takes a conditioning instead)."""
    return [io.Model.Input("model", tooltip=model), io.Clip.Input("clip", tooltip=clip, optional=clip_optional),
            io.Vae.Input("vae", tooltip=vae)]


def identity_folder_input(input_id: str) -> io.String.Input:
    """A folder of identities (one subfolder of images each), as the Meta-LoRA and DiffLoRA dataset nodes read."""
    return io.String.Input(input_id, default="idlora_meta_identities",
                           tooltip="A folder with one subfolder of images per identity; absolute, or relative to "
                                   "ComfyUI's input folder.")


def prompt_inputs(**prompts: tuple[str, str]) -> list[io.String.Input]:
    """One-line prompt inputs, in the order given: ``input_id=(default, tooltip)`` each."""
    return [io.String.Input(input_id, default=default, tooltip=tooltip)
            for input_id, (default, tooltip) in prompts.items()]


def class_word_input(default: str) -> io.String.Input:
    return io.String.Input("class_word", default=default,
                           tooltip="Prompts are templates such as 'a photo of sks <class word>'.")


class JobNode(io.ComfyNode):
    """A node that must run on every queue run, never cached: it starts a new job, scans its folder again or
    reads the current state of a job."""

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")


class BackgroundNode(io.ComfyNode):
    """A node with a ``mode`` input (see ``lora_nodes.background_inputs``): cached in blocking mode, a new job per
    queue run in background mode."""

    @classmethod
    def fingerprint_inputs(cls, mode: str = "blocking", **kwargs):
        return float("nan") if mode == "background" else ""
