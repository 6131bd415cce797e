"""Import this repository as the package ``idlora`` from scripts, tests and benchmarks.

The repository root is itself the package that ComfyUI loads from custom_nodes/, under
whatever folder name the clone has. Outside ComfyUI it is registered under a fixed name,
so that ``import idlora.training...`` works the same everywhere (and under torchrun).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def import_pack():
    if "idlora" not in sys.modules:
        spec = importlib.util.spec_from_file_location("idlora", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["idlora"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["idlora"]
