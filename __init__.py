"""IDLoRA: identity-preserving LoRA methods as ComfyUI nodes.

ComfyUI loads this package and calls ``comfy_entrypoint``. Nothing heavy is imported
here, so the pure-torch core (training/, models/) can be imported without ComfyUI.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import IDLoRAExtension

    return IDLoRAExtension()
