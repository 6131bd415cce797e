"""The job manager under faults: bad job files at start-up, a full disk in every state transition (injected and a
real tmpfs), corrupt checkpoints, stale temp files, failed submits, and output names that belong to one job."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

import idlora.training.jobs as jobs_mod
from idlora.training import fileio
from idlora.training.jobs import CheckpointError, JobManager, JobState
from idlora.training.lora_format import load_lora
from idlora.training.lora_job import LoraJobTask
from idlora.training.lora_trainer import LoraTrainConfig, LoraTrainer, prepare_data
from tiny_torch import TinyDiffusion, images

CFG = dict(steps=12, learning_rate=3e-3, rank=4, seed=5)
RESUME_TOL = 1e-6


def _loader(source: dict) -> TinyDiffusion:
    return TinyDiffusion(seed=source["seed"])


class SlowTrainer(LoraTrainer):
    delay = 0.05

    def train_step(self):
        time.sleep(self.delay)
        return super().train_step()


def _task(out_dir: Path, name: str, trainer_cls=LoraTrainer, **cfg) -> LoraJobTask:
    data = prepare_data(TinyDiffusion(seed=0), images(2), "a photo of sks person")
    out = out_dir / f"{name}.safetensors"
    return LoraJobTask(LoraTrainConfig(**{**CFG, **cfg}), str(out), f"idlora/{name}.safetensors", {"seed": 0},
                       _loader, data=data, trainer_cls=trainer_cls)


def _manager(root: Path, **kw) -> JobManager:
    m = JobManager(root, checkpoint_every=4, **kw)
    m.register("lora", lambda cfg, d: LoraJobTask.from_config(cfg, d, _loader))
    return m


@pytest.fixture
def manager(tmp_path):
    m = _manager(tmp_path / "jobs")
    yield m
    m.shutdown()


def _wait_step(m, job_id, step, timeout=60):
    t = time.time()
    while m.get(job_id).status.step < step:
        assert time.time() - t < timeout, m.get(job_id).status
        time.sleep(0.005)


def _max_diff(a_path, b_path) -> float:
    a, b = load_lora(a_path), load_lora(b_path)
    assert a.weights.keys() == b.weights.keys()
    return max(max((a.weights[k].up - b.weights[k].up).abs().max().item(),
                   (a.weights[k].down - b.weights[k].down).abs().max().item()) for k in a.weights)


def _on_disk(job) -> dict:
    return json.loads((job.dir / "status.json").read_text())


# -- output names ---------------------------------------------------------------------------------------------

def test_each_job_claims_its_own_output_file_also_after_a_restart(manager, tmp_path):
    out = tmp_path / "loras"
    out.mkdir()

    def files(n):
        return [str(out / f"{n}.safetensors")]
    first = manager.claim_name("dup", files)
    job = manager.submit(_task(out, first), name=first, outputs=files(first))
    assert first == "dup"
    second = manager.claim_name("dup", files)
    assert second == "dup_0001"  # the first job's file does not exist yet, but it is claimed
    manager.wait(job.id, 60)
    (out / "taken.safetensors").write_bytes(b"a user's file")
    assert manager.claim_name("taken", files) == "taken_0001"  # an existing file is never replaced
    manager.shutdown()
    again = _manager(tmp_path / "jobs")
    assert again.claim_name("dup", files) == "dup_0001"  # the recorded outputs stay claimed after a restart
    assert json.loads((job.dir / "config.json").read_text())["outputs"] == files("dup")


# -- start-up with bad job files ------------------------------------------------------------------------------

def _finished_job(root: Path, tmp_path: Path) -> str:
    m = _manager(root)
    job = m.submit(_task(tmp_path / "loras", "good", steps=3), name="good")
    m.wait(job.id, 60)
    m.shutdown()
    return job.id


@pytest.mark.parametrize("bad", ["[]", "{not json", "null", '{"state": "exploded"}', '{"id": 3, "step": "x"}'])
def test_an_unreadable_job_folder_is_skipped_and_reported_the_rest_loads(tmp_path, bad):
    root = tmp_path / "jobs"
    good = _finished_job(root, tmp_path)
    broken = root / "20260101-000000-abcdef"
    broken.mkdir()
    (broken / "status.json").write_text(bad)
    with (root / good / "loss.tsv").open("a") as f:
        f.write("4\ttrain\t")  # a short write: the crash cut the line
    m = _manager(root)
    try:
        assert [j.id for j in m.list()] == [good]
        assert [r["step"] for r in m.losses(good)] == [1, 2, 3]
        assert [u["folder"] for u in m.unreadable] == [str(broken)]
        assert broken.is_dir()  # reported, not deleted
    finally:
        m.shutdown()


def test_a_failed_submit_leaves_no_folder_and_old_leftovers_are_removed(tmp_path):
    root = tmp_path / "jobs"
    m = _manager(root)

    class Broken(LoraJobTask):
        def prepare(self, job_dir):
            raise OSError(errno.ENOSPC, "No space left on device")
    task = _task(tmp_path, "x")
    task.__class__ = Broken
    with pytest.raises(OSError):
        m.submit(task, name="x")
    assert list(root.iterdir()) == [] and m.list() == []
    m.shutdown()
    left = root / "20260101-000000-0a0b0c"  # what an older release left behind: config.json only
    left.mkdir()
    (left / "config.json").write_text("{}")
    foreign = root / "my notes"
    foreign.mkdir()
    _manager(root).shutdown()
    assert not left.exists() and foreign.exists()


def test_stale_temp_files_are_removed_and_live_writes_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = fileio._HOST
    stale = tmp_path / f".a.safetensors.{dead.pid}@{host}.0123456789ab.tmp"
    live = tmp_path / f".b.safetensors.{os.getpid()}@{host}.0123456789ab.tmp"
    old_legacy = tmp_path / "sub" / ".c.safetensors.0123456789ab.tmp"
    new_legacy = tmp_path / ".d.safetensors.0123456789ab.tmp"
    other = tmp_path / ".notes.tmp"
    for f in (stale, live, old_legacy, new_legacy, other):
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"x")
    past = time.time() - fileio.STALE_TEMP_AGE_S - 5
    os.utime(old_legacy, (past, past))
    removed = fileio.remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([str(stale), str(old_legacy)])
    assert live.exists() and new_legacy.exists() and other.exists()


def test_temp_files_never_end_in_the_destination_extension(tmp_path):
    seen = []
    with fileio.atomic_path(tmp_path / "x.safetensors") as tmp:
        seen.append(tmp)
        Path(tmp).write_bytes(b"1")
    assert seen[0].endswith(".tmp") and Path(seen[0]).name.startswith(".")
    assert fileio._TEMP_RE.match(Path(seen[0]).name)


# -- a full disk ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fail_when", ["running", "checkpoint", "succeeded", "cancelled"])
def test_a_failed_status_write_never_stops_the_worker_and_catches_up(tmp_path, monkeypatch, fail_when):
    """An injected ENOSPC at one status transition: the job still ends, the next job still runs, and status.json
    equals the in-memory status once writes succeed again."""
    m = _manager(tmp_path / "jobs")
    real = jobs_mod._write_status
    failing = {"on": True}

    def write(job):
        s = job.status
        due = (fail_when == "checkpoint" and s.state == JobState.RUNNING and s.step > 0) or s.state.value == fail_when
        if failing["on"] and due:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(job)
    monkeypatch.setattr(jobs_mod, "_write_status", write)
    a = m.submit(_task(tmp_path, "a", trainer_cls=SlowTrainer), name="a")
    b = m.submit(_task(tmp_path, "b", steps=3), name="b")
    if fail_when == "cancelled":
        _wait_step(m, a.id, 2)
        m.cancel(a.id)
        m.cancel(b.id)
    assert m.wait(a.id, 60).done.is_set() and m.wait(b.id, 60).done.is_set()
    expect = JobState.CANCELLED if fail_when == "cancelled" else JobState.SUCCEEDED
    assert a.status.state == expect and b.status.state == expect
    assert m._worker.is_alive()
    failing["on"] = False
    for job in m.list():  # list() writes what could not be written
        assert _on_disk(job) == job.status.to_json()
    m.shutdown()


def test_a_full_disk_in_a_checkpoint_says_so_and_the_job_resumes_once_space_returns(tmp_path, monkeypatch):
    m = _manager(tmp_path / "jobs")
    real_save = torch.save
    full = {"on": False}

    def save(obj, f, *a, **kw):
        if full["on"]:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(jobs_mod.torch, "save", save)
    monkeypatch.setattr(fileio, "free_mb", lambda path: 0.0)
    job = m.submit(_task(tmp_path, "full", trainer_cls=SlowTrainer), name="full")
    _wait_step(m, job.id, 2)
    full["on"] = True
    m.wait(job.id, 60)
    assert job.status.state == JobState.FAILED
    assert "no space left on" in job.status.error and "free at least" in job.status.error, job.status.error
    assert str(job.dir) in job.status.error
    full["on"] = False
    m.resume(job.id)
    m.wait(job.id, 60)
    assert job.status.state == JobState.SUCCEEDED and job.status.step == 12
    m.shutdown()


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                       capture_output=True, text=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"cannot mount a tmpfs here ({getattr(e, 'stderr', e)}); the injected-ENOSPC tests above "
                    f"cover the same transitions")


def test_a_real_full_disk_fails_the_job_keeps_the_worker_and_the_files_catch_up(tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "6m")
    try:
        m = _manager(disk / "jobs")
        out = disk / "loras"
        a = m.submit(_task(out, "a", trainer_cls=SlowTrainer, steps=60), name="a")
        b = m.submit(_task(out, "b", steps=8), name="b")
        _wait_step(m, a.id, 3)
        filler = disk / "filler"
        fd = os.open(filler, os.O_CREAT | os.O_WRONLY)  # fill the disk to the last byte
        for size in (1 << 16, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
        os.close(fd)
        assert m.wait(a.id, 60).done.is_set() and m.wait(b.id, 60).done.is_set()
        assert a.status.state == JobState.FAILED and "no space left on" in a.status.error, a.status.error
        assert b.status.state in (JobState.FAILED, JobState.SUCCEEDED)
        assert m._worker.is_alive()
        filler.unlink()
        for job in m.list():
            assert _on_disk(job) == job.status.to_json()
        assert not list(disk.rglob("*.tmp"))
        m.resume(a.id)
        m.wait(a.id, 120)
        assert a.status.state == JobState.SUCCEEDED, a.status.error
        m.shutdown()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# -- corrupt checkpoints -----------------------------------------------------------------------------------------

def test_a_corrupt_checkpoint_falls_back_then_restart_from_step_0(manager, tmp_path):
    ref = manager.submit(_task(tmp_path, "ref"), name="ref")
    manager.wait(ref.id, 60)
    job = manager.submit(_task(tmp_path, "cut", trainer_cls=SlowTrainer), name="cut")
    _wait_step(manager, job.id, 9)
    manager.cancel(job.id)
    manager.wait(job.id, 60)
    prev_step = torch.load(job.dir / "checkpoint.prev.pt", weights_only=True)["step"]
    assert prev_step >= 4
    (job.dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    manager.resume(job.id)
    manager.wait(job.id, 60)
    assert job.status.state == JobState.SUCCEEDED, job.status.error
    assert (job.dir / "checkpoint.unreadable.pt").exists()  # kept for inspection
    assert _max_diff(ref.status.result["path"], tmp_path / "cut.safetensors") <= RESUME_TOL
    assert [r["step"] for r in manager.losses(job.id)] == list(range(1, 13))

    again = manager.submit(_task(tmp_path, "again", trainer_cls=SlowTrainer), name="again")
    _wait_step(manager, again.id, 9)
    manager.cancel(again.id)
    manager.wait(again.id, 60)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (again.dir / name).write_bytes(b"\x80\x02garbage")
    manager.resume(again.id)
    manager.wait(again.id, 60)
    assert again.status.state == JobState.FAILED
    err = again.status.error
    assert err.startswith("CheckpointError") and "no readable checkpoint" in err and "/restart" in err, err
    assert "weights_only" not in err
    manager.restart(again.id)
    manager.wait(again.id, 60)
    assert again.status.state == JobState.SUCCEEDED and again.status.resumes == 2
    assert _max_diff(ref.status.result["path"], tmp_path / "again.safetensors") <= RESUME_TOL
    assert [r["step"] for r in manager.losses(again.id)] == list(range(1, 13))


def test_checkpoint_error_text_never_suggests_weights_only_false(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"obj": Path("a")}, bad)  # not a tensor type: refused by the weights-only unpickler
    with pytest.raises(Exception) as e:
        torch.load(bad, weights_only=True)
    assert "weights_only" in str(e.value)
    assert "weights_only" not in jobs_mod._short_reason(e.value)


def test_restart_is_refused_for_a_running_job(manager, tmp_path):
    job = manager.submit(_task(tmp_path, "run", trainer_cls=SlowTrainer), name="run")
    _wait_step(manager, job.id, 1)
    with pytest.raises(jobs_mod.JobError, match="only .* jobs can be restarted"):
        manager.restart(job.id)
    manager.cancel(job.id)
    manager.wait(job.id, 60)


def test_checkpoint_error_is_raised_by_the_context(tmp_path, manager):
    job = manager.submit(_task(tmp_path, "c", steps=2), name="c")
    manager.wait(job.id, 60)
    (job.dir / "checkpoint.pt").write_bytes(b"junk")
    ctx = jobs_mod.JobContext(manager, job)
    with pytest.raises(CheckpointError, match="Restart"):
        ctx.load_checkpoint()
    jobs_mod._close_logger(ctx.log)


def test_owner_names_the_job_of_a_claimed_file(manager, tmp_path):
    out = tmp_path / "o.safetensors"
    assert manager.owner(out) is None
    name = manager.claim_name("o", lambda n: [str(tmp_path / f"{n}.safetensors")])
    assert manager.owner(out) == ""  # reserved, no job yet
    job = manager.submit(_task(tmp_path, name, steps=2), name=name, outputs=[str(out)])
    assert manager.owner(out) == job.id
    manager.wait(job.id, 60)


def test_a_task_class_registers_itself_by_its_kind(tmp_path):
    m = JobManager(tmp_path / "jobs", checkpoint_every=4)
    m.register_task(LoraJobTask, _loader)
    job = m.submit(_task(tmp_path, "k", trainer_cls=SlowTrainer), name="k")
    _wait_step(m, job.id, 2)
    m.cancel(job.id)
    m.wait(job.id, 60)
    m.resume(job.id)  # rebuilt through LoraJobTask.from_config(config, folder, _loader)
    m.wait(job.id, 60)
    assert list(m.factories) == ["lora"] and job.status.state == JobState.SUCCEEDED, job.status.error
    m.shutdown()
