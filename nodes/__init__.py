"""IDLoRA's ComfyUI nodes (V3 schema) and HTTP routes."""
from comfy_api.latest import ComfyExtension, io

from . import routes
from .face_nodes import NODES as FACE_NODES
from .guidance_nodes import NODES as GUIDANCE_NODES
from .idstyle_nodes import NODES as IDSTYLE_NODES
from .job_nodes import NODES as JOB_NODES
from .lora_nodes import NODES as LORA_NODES

routes.register_with_server()


class IDLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*LORA_NODES, *JOB_NODES, *FACE_NODES, *IDSTYLE_NODES, *GUIDANCE_NODES]
