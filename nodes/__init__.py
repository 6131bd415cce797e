"""IDLoRA's ComfyUI nodes (V3 schema)."""
from comfy_api.latest import ComfyExtension, io

from .lora_nodes import NODES as LORA_NODES


class IDLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*LORA_NODES]
