"""vss.pipeline and vss.train keep their work: a stage is recorded only with a checkpoint that exists, one
process per pipeline / run directory (vss.locks), and a stopped or killed pipeline ends its stage's process."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import vss.pipeline
from conftest import REPO_ROOT, TINY_DATA
from vss.locks import LOCK_FILE, DirectoryInUse, DirectoryLock
from vss.pipeline import StageFailed, checkpoint_problem, parse_stages, run_pipeline

PY = sys.executable
HOLD = (
    "import os, sys, time\n"
    "from vss.locks import DirectoryLock\n"
    "DirectoryLock(sys.argv[1], sys.argv[2]).acquire()\n"
    "worker = os.fork() if sys.argv[3:] == ['fork'] else None\n"  # as a data-loader worker is forked
    "if worker == 0:\n"
    "    time.sleep(120)\n"
    "    os._exit(0)\n"
    "print('held', worker or '', flush=True)\n"
    "time.sleep(120)\n"
)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie left for a non-reaping init counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_until(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


class Lines:
    """A process's stdout lines, read by a thread (so a wait for a line has a timeout)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.seen, self.queue = proc, [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.queue.put(line)
        self.queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                line = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        pytest.fail(f"no line matching {pattern!r} in {timeout} s:\n{''.join(self.seen)[-4000:]}")


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; any left running are killed at the end."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def hold(
    directory: Path, what: str, started: list[subprocess.Popen], env: dict[str, str], fork: bool = False
) -> subprocess.Popen:
    """A process holding ``directory``'s lock (until killed); ``fork``: with a forked child, its PID in
    ``proc.worker``."""
    cmd = [PY, "-c", HOLD, str(directory), what, *(["fork"] if fork else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    started.append(proc)
    line = proc.stdout.readline().split()
    assert line[0] == "held"
    proc.worker = int(line[1]) if fork else None
    return proc


def write_checkpoint(path: Path, step: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(3)}, "global_step": step}, path)


# -- a stage is recorded only with its checkpoint ------------------------------------------------------------------


def test_checkpoint_problem_tells_missing_empty_and_cut_short(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    write_checkpoint(good)
    assert checkpoint_problem(good) is None
    assert checkpoint_problem(tmp_path / "none.ckpt") == "does not exist"
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert checkpoint_problem(tmp_path / "empty.ckpt") == "is not a complete checkpoint (0 bytes)"
    cut = good.read_bytes()[: good.stat().st_size // 2]
    (tmp_path / "cut.ckpt").write_bytes(cut)
    assert checkpoint_problem(tmp_path / "cut.ckpt") == f"is not a complete checkpoint ({len(cut)} bytes)"


def test_a_stage_without_its_checkpoint_is_not_recorded_and_runs_again(monkeypatch, tmp_path: Path) -> None:
    """The shortened-pipeline failure: a training stage that ends without ``last.ckpt`` (and no best checkpoint)
    gets no ``stage.json``; the next run trains it again, and a ``stage.json`` naming a checkpoint that has gone
    (an older vss, a deleted file) does not count as done."""
    calls: list[str] = []
    write = {"base": False}

    def fake_train(stage, stage_dir: Path, overrides, user) -> dict:
        calls.append(stage.name)
        if write.get(stage.name, True):
            write_checkpoint(stage_dir / "checkpoints" / "last.ckpt")
        return {"step": 20, "val": {"mIoU": 0.5}}

    monkeypatch.setattr(vss.pipeline, "train_stage", fake_train)
    stages = parse_stages([{"name": "base", "train": []}, {"name": "fine", "train": ["init_from={base}"]}])
    out = tmp_path / "pipe"
    with pytest.raises(StageFailed, match=r"stage base finished, but its checkpoint .*last.ckpt does not exist"):
        run_pipeline(stages, [], out)
    assert calls == ["base"] and not (out / "base" / "stage.json").exists()

    write["base"] = True  # the stage writes its checkpoint now: run again, not skipped
    records = run_pipeline(stages, [], out)
    assert calls == ["base", "base", "fine"]
    assert records["base"]["product"] == str((out / "base" / "checkpoints" / "last.ckpt").resolve())
    assert json.loads((out / "base" / "stage.json").read_text())["product"] == records["base"]["product"]
    assert not list(out.rglob("*.tmp"))  # stage.json written through a temporary file, none left

    run_pipeline(stages, [], out)  # all done: nothing runs
    assert calls == ["base", "base", "fine"]

    (out / "base" / "checkpoints" / "last.ckpt").unlink()  # the recorded checkpoint is gone: base runs again
    run_pipeline(stages, [], out)
    assert calls == ["base", "base", "fine", "base"]


def test_a_last_checkpoint_of_an_earlier_step_is_not_the_stages_product(monkeypatch, tmp_path: Path) -> None:
    """A run that ended at step 20 with ``last.ckpt`` of step 12 (written when it was stopped, then resumed)
    has no checkpoint of its final weights: not recorded."""

    def fake_train(stage, stage_dir: Path, overrides, user) -> dict:
        write_checkpoint(stage_dir / "checkpoints" / "last.ckpt", step=12)
        return {"step": 20, "val": {"mIoU": 0.5}}

    monkeypatch.setattr(vss.pipeline, "train_stage", fake_train)
    with pytest.raises(StageFailed, match=r"last.ckpt holds step 12, not the final step 20: nothing for the next"):
        run_pipeline(parse_stages([{"name": "base", "train": []}]), [], tmp_path / "pipe")
    assert not (tmp_path / "pipe" / "base" / "stage.json").exists()


def test_a_pass_whose_product_is_gone_runs_again(tmp_path: Path) -> None:
    stages = parse_stages([{"name": "mark", "run": {"_target_": "test_pipeline.record_product", "checkpoint": "x"}}])
    out = tmp_path / "pipe"
    run_pipeline(stages, [], out)
    (out / "mark" / "product.txt").unlink()
    run_pipeline(stages, [], out)
    assert (out / "mark" / "product.txt").read_text() == "x"


# -- one process per directory -------------------------------------------------------------------------------------


def test_a_held_directory_is_refused_with_the_holders_pid_and_a_dead_holders_lock_is_taken_over(
    tmp_path: Path, started: list[subprocess.Popen]
) -> None:
    run = tmp_path / "run"
    holder = hold(run, "run directory", started, dict(os.environ))
    with pytest.raises(DirectoryInUse) as info:
        DirectoryLock(run, "run directory").acquire()
    assert str(info.value).startswith(
        f"run directory {run.resolve()} is in use by PID {holder.pid} (python -c, since "
    ) and str(info.value).endswith(f"wait for it to end or stop it (kill {holder.pid}), then run this again")

    holder.kill()  # kill -9: the lock file stays behind, naming a PID that has ended
    holder.wait()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid
    lock = DirectoryLock(run, "run directory")
    assert lock.acquire() == (
        f"took over the lock of run directory {run.resolve()} from PID {holder.pid}, which has ended"
    )
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_FILE).exists()  # a holder that ends normally leaves no lock file
    with DirectoryLock(run, "run directory") as again:  # and the next one takes it without a note
        assert again.fd is not None


def test_a_process_holds_one_run_directory_at_a_time(tmp_path: Path) -> None:
    """``vss.train``'s lock: a second run in the same process (a ``-m`` sweep) lets go of the first; the end of
    ``train`` lets go of it (an in-process run must not block a later resume from a shell)."""
    from vss.locks import hold_run_directory, release_run_directory

    a, b = tmp_path / "a", tmp_path / "b"
    assert hold_run_directory(a) is None and (a / LOCK_FILE).is_file()
    assert hold_run_directory(a) is None  # the same directory again (a resume in-process): still held, no error
    with pytest.raises(DirectoryInUse, match=f"is in use by PID {os.getpid()} "):
        DirectoryLock(a).acquire()  # exclusive within the process too
    hold_run_directory(b)
    assert not (a / LOCK_FILE).exists() and (b / LOCK_FILE).is_file()
    release_run_directory()
    assert not (b / LOCK_FILE).exists()
    with DirectoryLock(b):
        pass


def test_a_forked_child_does_not_keep_its_killed_parents_lock(tmp_path: Path, started) -> None:
    """A training process killed with SIGKILL while its data-loader workers still run: the lock is free at once."""
    run = tmp_path / "run"
    holder = hold(run, "run directory", started, dict(os.environ), fork=True)
    try:
        with pytest.raises(DirectoryInUse, match=f"in use by PID {holder.pid} "):
            DirectoryLock(run, "run directory").acquire()
        holder.kill()
        holder.wait()
        assert running(holder.worker)
        lock = DirectoryLock(run, "run directory")
        assert f"from PID {holder.pid}, which has ended" in lock.acquire()
        lock.release()
    finally:
        os.kill(holder.worker, signal.SIGKILL)


def test_without_record_locks_the_pid_decides(monkeypatch, tmp_path: Path, started: list[subprocess.Popen]) -> None:
    """A file system without record locks (some network mounts): a live PID on this host holds the directory, a dead
    one's lock is taken over."""
    monkeypatch.setattr("vss.locks._lock_file", lambda fd: None)
    d = tmp_path / "d"
    d.mkdir()
    live = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"])
    started.append(live)
    (d / LOCK_FILE).write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename}))
    with pytest.raises(DirectoryInUse, match=f"is in use by PID {live.pid}"):
        DirectoryLock(d).acquire()
    live.kill()
    live.wait()
    lock = DirectoryLock(d)
    assert f"from PID {live.pid}, which has ended" in lock.acquire()
    lock.release()


def test_a_second_pipeline_on_a_directory_is_refused_in_one_line(
    tmp_path: Path, cli_env: dict[str, str], started: list[subprocess.Popen]
) -> None:
    pipe = tmp_path / "pipe"
    holder = hold(pipe, "pipeline directory", started, cli_env)
    cmd = [PY, "-m", "vss.pipeline", "pipeline=[{name:a,train:[]},{name:b,train:[]}]", f"pipeline_dir={pipe}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=cli_env, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.fullmatch(
        rf"error: pipeline directory {re.escape(str(pipe.resolve()))} is in use by PID {holder.pid} \(python -c, "
        rf"since [0-9: -]+\): one process at a time trains in a directory; wait for it to end or stop it "
        rf"\(kill {holder.pid}\), then run this again",
        done.stderr.strip().splitlines()[-1],
    ), done.stderr[-2000:]
    assert sorted(p.name for p in pipe.iterdir()) == [LOCK_FILE]  # no stage started


def test_vss_train_refuses_a_run_directory_in_use(
    tmp_path: Path, tiny_overrides: list[str], cli_env: dict[str, str], started: list[subprocess.Popen]
) -> None:
    """Two processes never train into one run directory (an orphaned stage and its rerun, two resumes): the
    second stops before it changes anything there."""
    run = tmp_path / "run"
    holder = hold(run, "run directory", started, cli_env)
    (run / "metrics.json").write_text("{}")
    cmd = [PY, "-m", "vss.train", *tiny_overrides, f"hydra.run.dir={run}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=cli_env, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: run directory {run.resolve()} is in use by PID {holder.pid} (python -c"), last
    assert (run / "metrics.json").read_text() == "{}"  # not deleted, as a starting run does
    assert not (run / "checkpoints").exists() and not (run / "csv").exists()


# -- a stopped or killed pipeline ends its stage -------------------------------------------------------------------

HARNESS = """
import sys
import vss.pipeline as p
p.STOP_GRACE_S = float(sys.argv[1])
child = [sys.executable, '-c', sys.argv[2]]
try:
    with p.stop_on_signals():
        p.run_stage_process(child, {}, lambda pid: print(pid, flush=True))
except p.Interrupted as e:
    sys.exit(128 + e.signum)
"""
CHILD = """
import signal, subprocess, sys, time
if sys.argv[1:] == ['ignore']:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
print(worker.pid, flush=True)
time.sleep(120)
"""


def start_harness(started: list[subprocess.Popen], grace: float = 60, ignore: bool = False) -> tuple:
    """The pipeline's stage launcher in a process; returns it, the stage's PID and the stage's worker's PID."""
    child = CHILD.replace("sys.argv[1:] == ['ignore']", str(ignore))
    proc = subprocess.Popen(
        [PY, "-c", HARNESS, str(grace), child], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    started.append(proc)
    stage, worker = int(proc.stdout.readline()), int(proc.stdout.readline())
    assert running(stage) and running(worker)
    return proc, stage, worker


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_stopping_the_pipeline_ends_its_stage_and_the_stages_workers(signum, started) -> None:
    proc, stage, worker = start_harness(started)
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == 128 + signum
    assert not running(stage) and wait_until(lambda: not running(worker), 10)


def test_killing_the_pipeline_with_sigkill_ends_its_stage(started) -> None:
    proc, stage, worker = start_harness(started)
    proc.kill()
    proc.wait()
    try:
        assert wait_until(lambda: not running(stage), 10)  # PR_SET_PDEATHSIG: SIGTERM to the stage
    finally:
        os.kill(worker, signal.SIGKILL)  # the stand-in worker has no parent watch of its own (torch's have)


def test_a_stage_that_ignores_sigterm_is_killed_after_the_grace_time(started) -> None:
    proc, stage, worker = start_harness(started, grace=1, ignore=True)
    begin = time.monotonic()
    proc.terminate()
    assert proc.wait(timeout=30) == 143 and time.monotonic() - begin < 20
    assert not running(stage) and wait_until(lambda: not running(worker), 10)


@pytest.mark.parametrize("kill", ["SIGTERM", pytest.param("SIGKILL", marks=pytest.mark.slow)])
def test_killing_vss_pipeline_ends_its_vss_train(
    kill, tmp_path: Path, tiny_overrides: list[str], cli_env: dict[str, str], started
) -> None:
    """The real command: the pipeline is killed while its stage's ``vss.train`` runs; that process ends too."""
    pipe = tmp_path / "pipe"
    user = [o for o in tiny_overrides if not o.startswith("trainer.max_steps=")] + ["trainer.max_steps=400"]
    cmd = [PY, "-m", "vss.pipeline", *user, "pipeline=[{name:base,train:[]}]"]
    proc = subprocess.Popen(
        [*cmd, f"pipeline_dir={pipe}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env
    )
    started.append(proc)
    stage = int(Lines(proc).wait_for(r"^\[vss.pipeline\] base \(PID (\d+)\): python -m vss.train", 120)[1])
    assert running(stage)
    proc.send_signal(getattr(signal, kill))
    proc.wait(timeout=180)
    assert proc.returncode == (143 if kill == "SIGTERM" else -9)
    assert wait_until(lambda: not running(stage), 180)


# -- the documented shortening -------------------------------------------------------------------------------------

DOCUMENTED = "python -m vss.pipeline experiment=stf_mar_synthetic trainer.max_steps=20"
SMALL_STF_DATA = (  # the tiny data of the other CLI tests, at the 64x64 frames the preset's 8x8 STF tables need
    *(o for o in TINY_DATA if not o.startswith(("++data.synthetic.height", "++data.synthetic.width"))),
    "data.batch_size=2",
    "data.val_batch_size=4",
    "data.num_workers=0",
    "data.train_repeat=2",
)


def test_the_shortening_is_documented_as_tested(cli_env: dict[str, str]) -> None:
    """The command the tests below run is the one the preset and ``--help`` print."""
    from vss.config import CONF_DIR

    preset = (CONF_DIR / "experiment" / "stf_mar_synthetic.yaml").read_text()
    assert re.search(rf"^#\s+{re.escape(DOCUMENTED)}\s+# every stage shortened$", preset, re.M)
    shown = subprocess.run([PY, "-m", "vss.pipeline", "--help"], capture_output=True, text=True, env=cli_env)
    assert shown.returncode == 0 and DOCUMENTED in " ".join(shown.stdout.split())


def documented_args(tmp_path: Path, data_dir: Path) -> list[str]:
    return [*DOCUMENTED.split()[3:], *SMALL_STF_DATA, f"paths.data_dir={data_dir}", f"paths.log_dir={tmp_path}"]


def test_the_documented_shortening_records_a_loadable_checkpoint(
    tmp_path: Path, make_data_dir, cli_env: dict[str, str], monkeypatch
) -> None:
    """Fast variant of the command below: its first stage (20 steps, validation every 200) ends with a
    ``stage.json`` whose checkpoint exists and holds the final step, the ``init_from`` the next stage reads."""
    from vss.pipeline import compose_stages

    for k, v in cli_env.items():
        monkeypatch.setenv(k, v)
    for k in [k for k in os.environ if k.startswith("VSS_")]:
        monkeypatch.delenv(k)
    args = documented_args(tmp_path, make_data_dir(*TINY_DATA[:4]))
    stages, _ = compose_stages(args)
    records = run_pipeline(stages[:1], args, tmp_path / "pipe")
    product = Path(records["pspnet"]["product"])
    assert records["pspnet"]["step"] == 20 and product.is_file()
    assert torch.load(product, map_location="cpu", weights_only=False)["global_step"] == 20
    assert not list((tmp_path / "pipe").rglob(LOCK_FILE))  # every lock let go


@pytest.mark.slow
def test_the_documented_shortened_pipeline_completes(tmp_path: Path, make_data_dir, cli_env: dict[str, str]) -> None:
    """``python -m vss.pipeline experiment=stf_mar_synthetic trainer.max_steps=20`` (tiny data added) runs all six
    stages: every training stage 20 steps, its recorded checkpoint there, the summary table written."""
    pipe = tmp_path / "pipe"
    args = documented_args(tmp_path, make_data_dir(*TINY_DATA[:4]))
    cmd = [PY, "-m", "vss.pipeline", *args, f"pipeline_dir={pipe}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=cli_env, cwd=REPO_ROOT, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = ["pspnet", "stf", "memory", "stf_mar", "pspnet_long", "stf_long"]
    records = json.loads((pipe / "pipeline.json").read_text())["stages"]
    assert list(records) == names
    for name in names:
        assert Path(records[name]["product"]).is_file()
        if records[name]["kind"] == "train":
            assert records[name]["step"] == 20
    table = (pipe / "pipeline.md").read_text()
    # total steps: its own 20 plus those of the checkpoints it started from (stf's 20, and pspnet's 20 before)
    assert "| PSPNet | - | 20 |" in table and "| PSPNet + STF + MAR | stf | 60 |" in table
    assert not list(pipe.rglob(LOCK_FILE))
