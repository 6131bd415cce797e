"""Background training jobs: a FIFO queue, one worker thread, a folder per job.

One device job runs at a time. A job is a ``Task`` (what to run, its phases and a
JSON config) plus a folder::

    <root>/<job id>/config.json    kind, name, phases, the task's config
                    status.json    state, phase, step, total, loss, error, result (rewritten atomically)
                    log.txt        the job's log
                    loss.tsv       step, phase, loss (one line per step)
                    checkpoint.pt  trainer state (adapter, optimizer, scheduler, RNG, step, phase)
                    checkpoint.prev.pt      the checkpoint before it (a fallback if the newest is unreadable)
                    samples/       preview images
                    data/          whatever the task needs to be rebuilt (cached latents, ...)

Each job has its own cancel token (ComfyUI's global interrupt belongs to the running
prompt and is never looked at here). Resume always rebuilds the task through the
factory registered for its kind, from config.json and the job folder, and continues
from the checkpoint, in the recorded phase. After a restart, jobs that were queued or
running are marked ``interrupted`` and can be resumed the same way; a job folder that
cannot be read is skipped and listed in ``unreadable``, never fatal.

Nothing here takes the worker down: a failed status write (a full disk) is logged, kept
in memory and written again on the next status write or query, so file and memory agree
once space returns. A job's output files are claimed at submit (``claim_name``): no two
jobs write the same file, and no job replaces a file that already exists.

Pure Python + torch: ComfyUI plugs in through ``events`` (websocket) and the task
factories.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from .fileio import atomic_path, atomic_write_bytes, disk_full_error, is_disk_full, remove_stale_temps

log = logging.getLogger(__name__)


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


FINISHED = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED}
RESUMABLE = {JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED}
FULL_GC_INTERVAL_S = 10.0  # at most one full collection per this many seconds on the CPU (ComfyUI's own interval)
JOB_ID_RE = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
UNREADABLE_CHECKPOINT = "checkpoint.unreadable.pt"


class JobError(ValueError):
    """A request about a job that cannot be honoured (unknown id, wrong state); says why and what to do."""


class UnknownJob(JobError):
    pass


class CheckpointError(RuntimeError):
    """No readable checkpoint to resume from; says how to go on."""


class JobCancelled(Exception):
    """Raised inside a task when its cancel token is set."""


class CancelToken:
    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise JobCancelled()


class Task(Protocol):
    kind: str                 # selects the factory that rebuilds the task on resume
    phases: list[str]         # in order; a checkpoint records the phase it belongs to
    config: dict              # JSON-able; written to config.json

    def prepare(self, job_dir: Path) -> None:
        """Persist what a rebuild needs (called once, at submit)."""

    def run(self, ctx: "JobContext") -> dict:
        """Train; return the result (e.g. {"lora": "idlora/x.safetensors"})."""


TaskFactory = Callable[[dict, Path], Task]   # (config.json contents, job folder) -> Task
EventSink = Callable[[str, dict], None]      # (event name, payload)


@dataclass
class JobStatus:
    id: str
    kind: str
    name: str
    state: JobState = JobState.QUEUED
    phases: list[str] = field(default_factory=list)
    phase: str = ""
    step: int = 0
    total: int = 0
    loss: float | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    result: dict = field(default_factory=dict)
    resumes: int = 0
    sec_per_step: float | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_json(cls, d: dict) -> "JobStatus":
        if not isinstance(d, dict):
            raise TypeError(f"status.json holds a {type(d).__name__}, not an object")
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["state"] = JobState(d.get("state", "queued"))
        return cls(**d)


class Job:
    def __init__(self, status: JobStatus, folder: Path, task: Task | None = None):
        self.status, self.dir, self.task = status, folder, task
        self.token = CancelToken()
        self.outputs: list[str] = []  # the files it writes (absolute paths), claimed at submit
        self.done = threading.Event()
        self.losses: list[tuple[int, str, float]] = _read_losses(folder / "loss.tsv")
        if status.state in FINISHED:
            self.done.set()

    @property
    def id(self) -> str:
        return self.status.id


class JobContext:
    """What a running task sees: its cancel token, progress, checkpoints, samples and log."""

    def __init__(self, manager: "JobManager", job: Job):
        self._m, self.job = manager, job
        self.token = job.token
        self.dir = job.dir
        self.log = _job_logger(job)
        self._last_emit = 0.0
        self._t_step = time.perf_counter()

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / CHECKPOINT

    def progress(self, step: int, total: int, loss: float | None = None, phase: str | None = None) -> None:
        s = self.job.status
        now = time.perf_counter()
        if step > s.step:
            s.sec_per_step = (now - self._t_step) / (step - s.step) if s.step or s.sec_per_step else None
        self._t_step = now
        s.step, s.total = step, total
        if phase is not None:
            s.phase = phase
        if loss is not None:
            s.loss = float(loss)
            self.job.losses.append((step, s.phase, float(loss)))
            try:
                with (self.dir / "loss.tsv").open("a") as f:
                    f.write(f"{step}\t{s.phase}\t{loss:.6g}\n")
            except OSError as e:
                if is_disk_full(e, self.dir):
                    raise disk_full_error(self.dir, 1 << 20, e) from e
                raise
        if now - self._last_emit >= self._m.min_event_interval or step >= total:
            self._last_emit = now
            self._m._emit_status(self.job)

    def rewind(self, step: int) -> None:
        """Forget losses after ``step`` (they are recomputed after a resume from that step)."""
        self.job.losses = [r for r in self.job.losses if r[0] <= step]
        atomic_write_bytes(self.dir / "loss.tsv", "".join(f"{s}\t{p}\t{v:.6g}\n" for s, p, v in self.job.losses).encode())
        self.job.status.step = step

    def checkpoint_due(self, step: int) -> bool:
        return self._m.checkpoint_every > 0 and step % self._m.checkpoint_every == 0

    def save_checkpoint(self, state: dict, phase: str | None = None) -> None:
        """Write the task's state atomically, tagged with its phase (default: the phase last reported); the
        checkpoint it replaces is kept as checkpoint.prev.pt."""
        state = dict(state, phase=phase or self.job.status.phase)
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(state, tmp)
            if self.checkpoint_path.exists():
                os.replace(self.checkpoint_path, self.dir / PREVIOUS_CHECKPOINT)
        self._m._persist(self.job)

    def load_checkpoint(self) -> dict | None:
        """The newest readable checkpoint, or None when the job has none. An unreadable newest checkpoint is moved
        to checkpoint.unreadable.pt and the previous one is used; with none readable, CheckpointError says how to
        restart the job from step 0."""
        problems = []
        for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
            path = self.dir / name
            if not path.exists():
                continue
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(state, dict):
                    raise TypeError(f"it holds a {type(state).__name__}, not a trainer state")
            except Exception as e:  # noqa: BLE001  any unreadable file: truncated, corrupt, foreign
                problems.append(f"{name}: {_short_reason(e)}")
                self.log.warning("checkpoint %s is unreadable (%s)", path, _short_reason(e))
                if name == CHECKPOINT:
                    os.replace(path, self.dir / UNREADABLE_CHECKPOINT)
                continue
            if problems:
                self.log.warning("resuming from the previous checkpoint (%s, step %s)", name, state.get("step"))
            return state
        if problems:
            raise CheckpointError(
                f"job {self.job.id} has no readable checkpoint ({'; '.join(problems)}). Restart it from step 0: "
                f"POST /idlora/jobs/{self.job.id}/restart, or the Restart button in the IDLoRA jobs panel")
        return None

    def add_sample(self, image: np.ndarray, step: int) -> str:
        """Save an (H, W, 3) float image in [0, 1] as samples/step_XXXXXX.png; returns the file name."""
        from PIL import Image
        name = f"step_{step:06d}.png"
        (self.dir / "samples").mkdir(exist_ok=True)
        buf = _png_bytes(Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)))
        atomic_write_bytes(self.dir / "samples" / name, buf)
        self._m._emit("idlora.sample", {"id": self.job.id, "step": step, "file": name})
        return name


class JobManager:
    """Owns the queue, the worker thread and the job folders under ``root``."""

    def __init__(self, root: str | os.PathLike, events: EventSink | None = None, checkpoint_every: int = 50,
                 min_event_interval: float = 0.1, on_job_end: Callable[[], None] | None = None,
                 full_gc_interval_s: float = FULL_GC_INTERVAL_S):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.events = events
        self.checkpoint_every = checkpoint_every
        self.min_event_interval = min_event_interval
        self.on_job_end = on_job_end
        self.factories: dict[str, TaskFactory] = {}
        self.jobs: dict[str, Job] = {}
        self.unreadable: list[dict] = []     # job folders skipped at start-up: {"folder", "error"}
        self._unsaved: set[str] = set()      # jobs whose status.json is behind their in-memory status
        self._reserved: set[str] = set()     # output files claimed for a job that is not submitted yet
        self._last_full_gc = 0.0
        self.full_gc_interval_s = full_gc_interval_s
        self._queue: deque[str] = deque()
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None
        self._stop = False
        self._recover()

    # -- registry --------------------------------------------------------
    def register(self, kind: str, factory: TaskFactory) -> None:
        self.factories[kind] = factory

    def register_task(self, task_cls: type, *resources: Any) -> None:
        """Register a Task class under its ``kind``: a resume rebuilds it with
        ``task_cls.from_config(config, job_folder, *resources)``."""
        self.register(task_cls.kind, lambda cfg, folder: task_cls.from_config(cfg, folder, *resources))

    def _recover(self) -> None:
        """Load the job folders; queued or running jobs of a previous process become interrupted. A folder that
        cannot be read, whatever the reason, is skipped, logged and listed in ``unreadable``."""
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir():
                continue
            try:
                self._recover_folder(folder)
            except Exception as e:  # noqa: BLE001  one bad folder must never stop the others (or the pack)
                log.warning("IDLoRA: skipping the job folder %s, which cannot be read (%s: %s)", folder,
                            type(e).__name__, e)
                self.unreadable.append({"folder": str(folder), "error": f"{type(e).__name__}: {e}"})

    def _recover_folder(self, folder: Path) -> None:
        remove_stale_temps(folder, untagged_age_s=0)  # only this server writes its job folders
        f = folder / "status.json"
        if not f.is_file():
            if JOB_ID_RE.match(folder.name) and (folder / "config.json").is_file():
                log.info("IDLoRA: removing %s, left by a submit that failed", folder)
                shutil.rmtree(folder)
            return
        status = JobStatus.from_json(json.loads(f.read_text()))
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        if status.state in (JobState.QUEUED, JobState.RUNNING):
            status.state = JobState.INTERRUPTED
            status.error = "the server stopped while this job was " + ("running" if status.started else "queued")
            status.finished = time.time()
        job = Job(status, folder)
        job.outputs = _output_paths(config)
        self.jobs[status.id] = job
        self._persist(job)

    def owner(self, path: str | os.PathLike) -> str | None:
        """The id of the job whose output ``path`` is; '' when it is reserved for a job not submitted yet; else None."""
        p = os.path.abspath(path)
        owner = next((job.id for job in self.jobs.values() if p in job.outputs), None)
        return "" if owner is None and p in self._reserved else owner

    def claim_name(self, stem: str, outputs: Callable[[str], list]) -> str:
        """The first of ``stem``, ``stem_0001``, ``stem_0002``, ... whose output files (``outputs(name)``) neither
        exist nor belong to another job. The files are reserved for the job submitted with them (and for the life of
        this process if none is), so a job's output belongs to it alone."""
        with self._cv:
            for n in range(100_000):
                name = stem if n == 0 else f"{stem}_{n:04d}"
                paths = [os.path.abspath(p) for p in outputs(name)]
                if not any(os.path.lexists(p) or self.owner(p) is not None for p in paths):
                    self._reserved.update(paths)
                    return name
        raise JobError(f"every name from {stem!r} to {stem}_99999 is taken: choose another name")

    # -- requests ----------------------------------------------------------
    def submit(self, task: Task, name: str = "", outputs: list | tuple = ()) -> Job:
        """Queue ``task``. ``outputs`` are the files it will write (claimed with ``claim_name``); they are recorded
        in config.json so that they stay the job's after a restart. A submit that fails leaves no job folder."""
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        folder = self.root / job_id
        folder.mkdir(parents=True)
        try:
            status = JobStatus(job_id, task.kind, name or task.kind, phases=list(task.phases),
                               phase=task.phases[0] if task.phases else "")
            config = {"kind": task.kind, "name": status.name, "phases": list(task.phases), "config": task.config,
                      "outputs": [os.path.abspath(p) for p in outputs]}
            atomic_write_bytes(folder / "config.json", json.dumps(config, indent=1).encode())
            task.prepare(folder)
            job = Job(status, folder, task)
            job.outputs = config["outputs"]
            _write_status(job)  # raises here, before the job is listed, when the disk is full
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with self._cv:
            self.jobs[job_id] = job
            self._reserved.difference_update(job.outputs)  # the job owns them now
            self._enqueue(job)
        return job

    def get(self, job_id: str) -> Job:
        self._flush_unsaved()
        job = self.jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"no job with id {job_id!r}: list the jobs with GET /idlora/jobs")
        return job

    def list(self) -> list[Job]:
        self._flush_unsaved()
        return sorted(self.jobs.values(), key=lambda j: j.status.created)

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        with self._cv:
            state = job.status.state
            if state == JobState.QUEUED:
                self._queue.remove(job_id)
                self._finish(job, JobState.CANCELLED, "cancelled before it started")
            elif state == JobState.RUNNING:
                job.token.cancel()  # the worker saves a checkpoint and marks it cancelled
            else:
                raise JobError(f"job {job_id} is {state.value}; only queued or running jobs can be cancelled")
        return job

    def resume(self, job_id: str) -> Job:
        job = self.get(job_id)
        with self._cv:
            _require_resumable(job, "resumed")
            if job.status.kind not in self.factories:
                raise JobError(f"job {job_id} is of kind {job.status.kind!r}, which this server cannot rebuild "
                               f"(known kinds: {sorted(self.factories)})")
            job.task = None  # rebuilt by the worker from config.json and the job folder
            job.token = CancelToken()
            job.done.clear()
            job.status.resumes += 1
            job.status.error = None
            job.status.finished = None
            self._enqueue(job)
            self._persist(job)
        return job

    def restart(self, job_id: str) -> Job:
        """Resume a failed, cancelled or interrupted job from step 0: its checkpoints and loss log are discarded
        (an unreadable checkpoint stays as checkpoint.unreadable.pt for inspection)."""
        job = self.get(job_id)
        with self._cv:
            _require_resumable(job, "restarted")
            for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
                (job.dir / name).unlink(missing_ok=True)
            (job.dir / "loss.tsv").unlink(missing_ok=True)
            job.losses = []
            job.status.step, job.status.loss = 0, None
            job.status.phase = job.status.phases[0] if job.status.phases else ""
        return self.resume(job_id)

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        job = self.get(job_id)
        job.done.wait(timeout)
        return job

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            for job in self.jobs.values():
                if job.status.state == JobState.RUNNING:
                    job.token.cancel()
            self._cv.notify_all()
        if self._worker:
            self._worker.join(timeout)

    # -- worker ------------------------------------------------------------
    def _enqueue(self, job: Job) -> None:
        job.status.state = JobState.QUEUED
        self._queue.append(job.id)
        self._emit_status(job)
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="idlora-jobs", daemon=True)
            self._worker.start()
        self._cv.notify_all()

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                job = self.jobs[self._queue.popleft()]
                job.status.state = JobState.RUNNING
                job.status.started = job.status.started or time.time()
            try:
                self._persist(job)
                self._emit_status(job)
                self._run(job)
            except Exception as e:  # noqa: BLE001  the worker outlives anything a job or a transition raises
                log.exception("IDLoRA: job %s: %s", job.id, e)
                if not job.done.is_set():
                    self._finish(job, JobState.FAILED, f"{type(e).__name__}: {e}")

    def _run(self, job: Job) -> None:
        ctx = None
        try:
            ctx = JobContext(self, job)
            if job.task is None:
                config = json.loads((job.dir / "config.json").read_text())
                job.task = self.factories[job.status.kind](config["config"], job.dir)
            ctx.log.info("running (resume #%d)", job.status.resumes)
            result = job.task.run(ctx)
            job.status.result = result or {}
            self._finish(job, JobState.SUCCEEDED)
        except JobCancelled:
            self._finish(job, JobState.CANCELLED, "cancelled")
        except BaseException as e:  # noqa: BLE001  a worker exception never takes the server down
            if ctx is not None:
                ctx.log.error("failed: %s\n%s", e, traceback.format_exc())
            self._finish(job, JobState.FAILED, f"{type(e).__name__}: {e}")
            if not isinstance(e, Exception):  # KeyboardInterrupt / SystemExit: let the process stop
                raise
        finally:
            job.task = None  # release the model and data: resume rebuilds them
            if ctx is not None:
                _close_logger(ctx.log)
            self._collect_garbage()
            if self.on_job_end:
                try:
                    self.on_job_end()
                except Exception as e:  # noqa: BLE001
                    log.warning("IDLoRA: the end-of-job hook failed: %s", e)

    def _finish(self, job: Job, state: JobState, error: str | None = None) -> None:
        # State and done-flag change together under the lock: a resume that sees the final state must not have
        # its cleared done-flag set again by this finish.
        with self._cv:
            job.status.state, job.status.error, job.status.finished = state, error, time.time()
            self._persist(job)
            job.done.set()
        self._emit_status(job)

    def _collect_garbage(self) -> None:
        """Free the finished job's model. A full collection walks every object of the process (about 0.2 s for
        ComfyUI's 440 k) holding the interpreter lock, so every request waits for it: on the CPU it runs at most
        once per ``full_gc_interval_s`` (a queue of short jobs would otherwise stall the server at each job end),
        with a young-generation pass in between. On CUDA, where the next job needs the device memory back, it
        runs after every job, followed by emptying the cache."""
        now = time.monotonic()
        if torch.cuda.is_available() or now - self._last_full_gc >= self.full_gc_interval_s:
            gc.collect()
            self._last_full_gc = time.monotonic()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            gc.collect(1)

    # -- status files ------------------------------------------------------------
    def _persist(self, job: Job) -> None:
        """Write the job's status.json; a failure (a full disk) is logged and retried on the next write or query,
        never raised: the in-memory status stays the truth and the file catches up once the write succeeds."""
        self._flush_unsaved(skip=job.id)
        try:
            _write_status(job)
            self._unsaved.discard(job.id)
        except Exception as e:  # noqa: BLE001
            if job.id not in self._unsaved:
                log.warning("IDLoRA: could not write the status of job %s (%s); it is kept in memory and written "
                            "again later", job.id, e)
            self._unsaved.add(job.id)

    def _flush_unsaved(self, skip: str | None = None) -> None:
        for job_id in list(self._unsaved):
            job = self.jobs.get(job_id)
            if job is None:
                self._unsaved.discard(job_id)
            elif job_id != skip:
                try:
                    _write_status(job)
                    self._unsaved.discard(job_id)
                except Exception:  # noqa: BLE001  still no space: try again later
                    return

    # -- events --------------------------------------------------------------
    def _emit(self, name: str, payload: dict) -> None:
        if self.events:
            try:
                self.events(name, payload)
            except Exception as e:  # noqa: BLE001  a dead websocket must not stop training
                log.debug("IDLoRA: event %s not sent: %s", name, e)

    def _emit_status(self, job: Job) -> None:
        self._emit("idlora.job", job.status.to_json())

    # -- queries ---------------------------------------------------------------
    def losses(self, job_id: str, since_step: int = 0, stride: int = 1) -> list[dict]:
        if stride < 1:
            raise JobError(f"stride must be >= 1, got {stride}")
        rows = [r for r in self.get(job_id).losses if r[0] > since_step]
        return [{"step": s, "phase": p, "loss": v} for s, p, v in rows[::stride]]

    def samples(self, job_id: str) -> list[str]:
        folder = self.get(job_id).dir / "samples"
        return sorted(p.name for p in folder.glob("*.png")) if folder.is_dir() else []


# -- a task's cached data ----------------------------------------------------------------

JOB_DATA = "data.pt"


def save_job_data(job_dir: str | os.PathLike, payload: dict) -> None:
    """Write what a task needs to be rebuilt (encoded images, prompts, LoRAs: tensors, lists, dicts, numbers) to
    the job folder's data.pt, atomically."""
    with atomic_path(Path(job_dir) / JOB_DATA) as tmp:
        torch.save(payload, tmp)


def load_job_data(job_dir: str | os.PathLike, what: str) -> dict:
    """The payload ``save_job_data`` wrote; ``what`` says what it holds, for the error when it is missing or
    unreadable (the job then cannot be rebuilt and must be started again from its workflow)."""
    path = Path(job_dir) / JOB_DATA
    if not path.exists():
        raise FileNotFoundError(f"the job folder {job_dir} lacks {JOB_DATA} ({what}); the job cannot be rebuilt: "
                                f"start it again from its workflow")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  truncated or corrupt
        raise CheckpointError(f"the job's {path} ({what}) is unreadable ({_short_reason(e)}); the job cannot be "
                              f"rebuilt: start it again from its workflow") from None


# -- helpers ------------------------------------------------------------------------

def _require_resumable(job: Job, verb: str) -> None:
    if job.status.state not in RESUMABLE:
        raise JobError(f"job {job.id} is {job.status.state.value}; only "
                       f"{', '.join(sorted(s.value for s in RESUMABLE))} jobs can be {verb}")


def _write_status(job: Job) -> None:
    atomic_write_bytes(job.dir / "status.json", json.dumps(job.status.to_json(), indent=1).encode())


def _read_losses(path: Path) -> list[tuple[int, str, float]]:
    """The rows of loss.tsv; a line that does not parse (a short write cut by a crash or a full disk) is skipped."""
    rows, bad = [], 0
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split("\t")
            try:
                rows.append((int(parts[0]), parts[1], float(parts[2])))
            except (ValueError, IndexError):
                bad += bool(line.strip())
    if bad:
        log.warning("IDLoRA: skipped %d unreadable line(s) of %s", bad, path)
    return rows


def _output_paths(config: dict) -> list[str]:
    """The files a job writes, from its config.json: the recorded ``outputs``, or, for jobs submitted before those
    were recorded, every ``output_path`` / ``path`` in its task config."""
    if isinstance(config.get("outputs"), list):
        return [os.path.abspath(p) for p in config["outputs"] if isinstance(p, str)]
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("output_path", "path") and isinstance(v, str):
                    found.append(os.path.abspath(v))
                else:
                    walk(v)
    walk(config.get("config"))
    return found


def _short_reason(e: BaseException) -> str:
    """An exception in a few words, without torch's advice to load with weights_only=False (which would run
    arbitrary code from the file)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if "weights_only" in str(e) or "Weights only" in str(e):
        first = "not a valid checkpoint"
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def _job_logger(job: Job) -> logging.Logger:
    logger = logging.getLogger(f"idlora.job.{job.id}")
    handler = logging.FileHandler(job.dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


def _close_logger(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def _png_bytes(img: Any) -> bytes:
    import io
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
