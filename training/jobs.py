"""Background training jobs: a FIFO queue, one worker thread, a folder per job.

One device job runs at a time. A job is a ``Task`` (what to run, its phases and a
JSON config) plus a folder::

    <root>/<job id>/config.json    kind, name, phases, the task's config
                    status.json    state, phase, step, total, loss, error, result (rewritten atomically)
                    log.txt        the job's log
                    loss.tsv       step, phase, loss (one line per step)
                    checkpoint.pt  trainer state (adapter, optimizer, scheduler, RNG, step, phase)
                    samples/       preview images
                    data/          whatever the task needs to be rebuilt (cached latents, ...)

Each job has its own cancel token (ComfyUI's global interrupt belongs to the running
prompt and is never looked at here). Resume always rebuilds the task through the
factory registered for its kind, from config.json and the job folder, and continues
from the checkpoint, in the recorded phase. After a restart, jobs that were queued or
running are marked ``interrupted`` and can be resumed the same way.

Pure Python + torch: ComfyUI plugs in through ``events`` (websocket) and the task
factories.
"""
from __future__ import annotations

import gc
import json
import logging
import os
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

from .fileio import atomic_path, atomic_write_bytes

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


class JobError(ValueError):
    """A request about a job that cannot be honoured (unknown id, wrong state); says why and what to do."""


class UnknownJob(JobError):
    pass


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
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["state"] = JobState(d.get("state", "queued"))
        return cls(**d)


class Job:
    def __init__(self, status: JobStatus, folder: Path, task: Task | None = None):
        self.status, self.dir, self.task = status, folder, task
        self.token = CancelToken()
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
        return self.dir / "checkpoint.pt"

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
            with (self.dir / "loss.tsv").open("a") as f:
                f.write(f"{step}\t{s.phase}\t{loss:.6g}\n")
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
        """Write the task's state atomically, tagged with its phase (default: the phase last reported)."""
        state = dict(state, phase=phase or self.job.status.phase)
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(state, tmp)
        _write_status(self.job)

    def load_checkpoint(self) -> dict | None:
        if not self.checkpoint_path.exists():
            return None
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)

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
                 min_event_interval: float = 0.1, on_job_end: Callable[[], None] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.events = events
        self.checkpoint_every = checkpoint_every
        self.min_event_interval = min_event_interval
        self.on_job_end = on_job_end
        self.factories: dict[str, TaskFactory] = {}
        self.jobs: dict[str, Job] = {}
        self._queue: deque[str] = deque()
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None
        self._stop = False
        self._recover()

    # -- registry --------------------------------------------------------
    def register(self, kind: str, factory: TaskFactory) -> None:
        self.factories[kind] = factory

    def _recover(self) -> None:
        """Load the job folders; queued or running jobs of a previous process become interrupted."""
        for folder in sorted(self.root.iterdir()):
            f = folder / "status.json"
            if not f.is_file():
                continue
            try:
                status = JobStatus.from_json(json.loads(f.read_text()))
            except (ValueError, TypeError, KeyError) as e:
                log.warning("IDLoRA: skipping job folder %s with an unreadable status.json (%s)", folder, e)
                continue
            if status.state in (JobState.QUEUED, JobState.RUNNING):
                status.state = JobState.INTERRUPTED
                status.error = "the server stopped while this job was " + ("running" if status.started else "queued")
                status.finished = time.time()
            job = Job(status, folder)
            self.jobs[status.id] = job
            _write_status(job)

    # -- requests ----------------------------------------------------------
    def submit(self, task: Task, name: str = "") -> Job:
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        folder = self.root / job_id
        folder.mkdir(parents=True)
        status = JobStatus(job_id, task.kind, name or task.kind, phases=list(task.phases),
                           phase=task.phases[0] if task.phases else "")
        config = {"kind": task.kind, "name": status.name, "phases": list(task.phases), "config": task.config}
        atomic_write_bytes(folder / "config.json", json.dumps(config, indent=1).encode())
        task.prepare(folder)
        job = Job(status, folder, task)
        with self._cv:
            self.jobs[job_id] = job
            _write_status(job)
            self._enqueue(job)
        return job

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"no job with id {job_id!r}: list the jobs with GET /idlora/jobs")
        return job

    def list(self) -> list[Job]:
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
            if job.status.state not in RESUMABLE:
                raise JobError(f"job {job_id} is {job.status.state.value}; only "
                               f"{', '.join(sorted(s.value for s in RESUMABLE))} jobs can be resumed")
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
            _write_status(job)
        return job

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
                _write_status(job)
            self._emit_status(job)
            self._run(job)

    def _run(self, job: Job) -> None:
        ctx = JobContext(self, job)
        try:
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
            ctx.log.error("failed: %s\n%s", e, traceback.format_exc())
            self._finish(job, JobState.FAILED, f"{type(e).__name__}: {e}")
            if not isinstance(e, Exception):  # KeyboardInterrupt / SystemExit: let the process stop
                raise
        finally:
            job.task = None  # release the model and data: resume rebuilds them
            _close_logger(ctx.log)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if self.on_job_end:
                self.on_job_end()

    def _finish(self, job: Job, state: JobState, error: str | None = None) -> None:
        # State and done-flag change together under the lock: a resume that sees the final state must not have
        # its cleared done-flag set again by this finish.
        with self._cv:
            job.status.state, job.status.error, job.status.finished = state, error, time.time()
            _write_status(job)
            job.done.set()
        self._emit_status(job)

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


# -- helpers ------------------------------------------------------------------------

def _write_status(job: Job) -> None:
    atomic_write_bytes(job.dir / "status.json", json.dumps(job.status.to_json(), indent=1).encode())


def _read_losses(path: Path) -> list[tuple[int, str, float]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                rows.append((int(parts[0]), parts[1], float(parts[2])))
    return rows


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
