"""IDLoRA's ComfyUI nodes (V3 schema) and HTTP routes.

The node modules are imported when ComfyUI asks for the node list, so that importing one helper of this package
(e.g. ``nodes.comfy_adapter`` in a benchmark or under torchrun) does not import every node.
"""
from comfy_api.latest import ComfyExtension, io

from . import routes

routes.register_with_server()

NODE_MODULES = ("lora_nodes", "job_nodes", "face_nodes", "metric_nodes", "idstyle_nodes", "guidance_nodes",
                "meta_lora_nodes", "meta_lora_eval_nodes", "duolora_nodes", "difflora_nodes", "board_nodes")


class IDLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from importlib import import_module
        return [node for name in NODE_MODULES for node in import_module(f"{__name__}.{name}").NODES]
