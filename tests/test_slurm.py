"""On a real SLURM cluster (``scripts/slurm-local.sh start`` makes a one-node one here; skipped when none answers):
a submitit sweep (one job per point, collected), a 2-task CPU DDP job through sbatch/srun (one run directory, the
same validation as one process), and requeued jobs (plain sbatch, and a 2-rank submitit job) that resume from
their own ``last.ckpt`` exactly once and finish with the step count intact; on two nodes
(``VSS_SLURM_NODES=2 scripts/slurm-local.sh start``), a DDP job over both. ``make test-slurm`` runs them: on the
one-node cluster all but the two-node test, on the two-node cluster those that fit one CPU per node."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from omegaconf import OmegaConf

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow
JOB_TIMEOUT_S = 600
START = "scripts/slurm-local.sh start"


def slurm_down_reason() -> str | None:
    """Why no SLURM cluster can take jobs here (None when a node is up)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return f"SLURM is not installed here: run `{START}` (installs slurm-wlm and munge, starts the daemons)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"SLURM is not running (sinfo timed out): run `{START}`"
    if out.returncode != 0:
        return f"SLURM is not running (sinfo: {out.stderr.strip()}): run `{START}`"
    if not any(s.rstrip("*~#").startswith(("idle", "mix", "alloc")) for s in out.stdout.split()):
        return f"no SLURM node is up (sinfo: {out.stdout.split()}): run `{START}`"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    """Skip, saying how to start one, when no SLURM cluster answers."""
    reason = slurm_down_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def submitit(slurm: None) -> None:
    """The optional extra ``slurm`` (hydra-submitit-launcher)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the extra: pip install -e '.[slurm]'")


def sbatch(script: str, path: Path, env: dict[str, str]) -> str:
    """Submit ``script`` (written to ``path``) from the repository root; returns the job id."""
    path.write_text(script)
    out = subprocess.run(
        ["sbatch", "--parsable", str(path)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def squeue(job: str) -> tuple[str, str] | None:
    """(state, reason) of a job in the queue, None once it has left it."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True, timeout=60)
    fields = out.stdout.split()
    return (fields[0], fields[1] if len(fields) > 1 else "") if out.returncode == 0 and fields else None


def release_requeued(job: str) -> None:
    """SLURM holds a requeued job for a while (reason BeginTime): let it start now (the tests' only shortcut)."""
    if (squeue(job) or ("", ""))[1] == "BeginTime":
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, timeout=60)


def wait_gone(job: str, timeout: float = JOB_TIMEOUT_S) -> None:
    """Wait until ``job`` has left the queue (releasing a requeued one); fail past ``timeout``."""
    end = time.monotonic() + timeout
    while squeue(job) is not None:
        assert time.monotonic() < end, f"SLURM job {job} still queued after {timeout} s: {squeue(job)}"
        release_requeued(job)
        time.sleep(1)


def job_info(job: str) -> dict[str, str]:
    """``scontrol show job`` as key=value pairs (kept for MinJobAge after the end)."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=60)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def steps_done(log: Path, total: int) -> int:
    """The last training step the progress bar (``step: ... | n/total [``) shows in ``log``; 0 before."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    found = re.findall(rf"\|\s*(\d+)/{total} \[", text)
    return int(found[-1]) if found else 0


def signal_when(job: str, log: Path, total: int, at_least: int) -> None:
    """Send the requeue signal (SIGUSR1 to every task) once ``log`` shows ``at_least`` steps."""
    end = time.monotonic() + JOB_TIMEOUT_S
    while steps_done(log, total) < at_least:
        assert squeue(job) is not None, f"job {job} ended before step {at_least}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < end, f"job {job} did not reach step {at_least}"
        time.sleep(0.3)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=60)


def check_resumed_once(text: str, job: str, run_dir: Path, total: int) -> tuple[int, int, int]:
    """The job's log shows one stop at step s, one requeue, one resume from ``run_dir``'s last.ckpt at step s, and
    the run ends at ``total``; returns (interrupted, resumed, final) steps."""
    stopped = re.findall(r"\[vss\] requeued SLURM job \S+ at step (\d+)", text)
    resumed = re.findall(rf"resuming from {re.escape(str(run_dir))}/checkpoints/last\.ckpt \(step (\d+)\)", text)
    assert len(stopped) == 1 and len(resumed) == 1, text[-4000:]
    assert text.count("restarted (restart 1): resuming its run") == 1 and "restart 2" not in text
    final = json.loads((run_dir / "metrics.json").read_text())["step"]
    assert int(stopped[0]) == int(resumed[0]) and 0 < int(stopped[0]) < total and final == total
    assert not list(run_dir.glob("**/hpc_ckpt_*.ckpt"))  # Lightning's own requeue stayed off
    print(f"[test] job {job}: interrupted at step {stopped[0]}, resumed from step {resumed[0]}, final step {final}")
    return int(stopped[0]), int(resumed[0]), final


def test_submitit_sweep_runs_one_job_per_point_and_collects(
    submitit: None, run_cli: Callable, tiny_args: Callable, tmp_path: Path, collect: ModuleType
) -> None:
    logs = tmp_path / "logs"
    done = run_cli("-m", "hydra/launcher=submitit_slurm", *tiny_args(logs), "seed=1,2", timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    (sweep,) = (logs / "train" / "multiruns").iterdir()
    ids = {}
    for job in ("0", "1"):
        assert json.loads((sweep / job / "metrics.json").read_text())["step"] == 4
        ids[job] = str(OmegaConf.load(sweep / job / ".hydra" / "hydra.yaml").hydra.job.id)
        assert (sweep / ".submitit" / ids[job]).is_dir()  # its own SLURM job (an array task), its own logs
        wait_gone(ids[job], timeout=120)  # submitit returns once the result is written; the job ends just after
        assert job_info(ids[job]).get("JobState") == "COMPLETED"
    assert ids["0"] != ids["1"] and "| seed |" in (sweep / "sweep.md").read_text()
    runs = collect.find_runs([sweep])
    assert sorted(int(r.cfg.seed) for r in runs) == [1, 2]
    page = tmp_path / "table1.md"
    page.write_text("<!-- ours-synthetic:start -->\n<!-- ours-synthetic:end -->\n")
    assert collect.main(["table1", str(sweep), "--no-bench", "--page", str(page)]) == 0
    assert "| SegFormer |" in page.read_text() and "| 2 | 4 |" in page.read_text()  # one row of 2 runs, 4 steps
    print(f"[test] sweep {sweep}: jobs {ids}")


# 3 validation videos of 17 frames: they do not split evenly over 2 ranks (a padding sampler would duplicate
# frames); val_batch_size=1: every frame is computed alone in both runs, whatever the sharding
DDP_DATA = ("data.synthetic.val_videos=3", "++data.synthetic.min_frames=17", "++data.synthetic.max_frames=17")


def slurm_nodes() -> dict[str, int]:
    """CPUs of each idle node of the cluster."""
    out = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N %c"], capture_output=True, text=True, timeout=60)
    return {name: int(cpus) for name, cpus in (line.split() for line in out.stdout.splitlines())}


@pytest.mark.parametrize(
    ("nodes", "tasks_per_node"),
    [pytest.param(1, 2, id="1-node-2-tasks"), pytest.param(2, 1, id="2-nodes-1-task-each")],
)
def test_ddp_job_through_srun_writes_one_run_and_validates_as_one_process(
    nodes: int,
    tasks_per_node: int,
    slurm: None,
    cli_env: dict[str, str],
    tiny_args: Callable,
    make_data_dir: Callable,
    tmp_path: Path,
) -> None:
    """DDP over gloo on CPU through sbatch/srun: one node with two tasks, or two nodes (``VSS_SLURM_NODES=2
    scripts/slurm-local.sh start``: the second node is a network namespace, reached over the veth ``vssgl``)."""
    fitting = [n for n, cpus in slurm_nodes().items() if cpus >= tasks_per_node]
    if len(fitting) < nodes:
        setup = "VSS_SLURM_NODES=2 scripts/slurm-local.sh start" if nodes > 1 else START
        pytest.skip(f"needs {nodes} idle node(s) with {tasks_per_node} CPU(s) (have {slurm_nodes()}): {setup}")
    logs = tmp_path / "logs"
    knobs = [a for a in tiny_args(logs) if a.startswith(("data.synthetic.", "++data.synthetic."))]
    knobs = [k for k in knobs if k.split("=")[0] not in {d.split("=")[0] for d in DDP_DATA}] + list(DDP_DATA)
    data = [*tiny_args(logs), *DDP_DATA, f"paths.data_dir={make_data_dir(*knobs)}", "data.val_batch_size=1"]
    trainer = [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        f"trainer.devices={tasks_per_node}",
        f"trainer.num_nodes={nodes}",
    ]
    gloo = "export GLOO_SOCKET_IFNAME=vssgl" if Path("/sys/class/net/vssgl").exists() else ""  # the two-node setup
    script = f"""#!/bin/bash
#SBATCH --job-name=vss-ddp
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={tasks_per_node}
#SBATCH --cpus-per-task=1
#SBATCH --output={tmp_path}/%j.out
{gloo}
srun {sys.executable} -m vss.train {" ".join([*trainer, *data])}
"""
    job = sbatch(script, tmp_path / "ddp.sh", cli_env)
    wait_gone(job)
    text = (tmp_path / f"{job}.out").read_text(errors="replace")
    info = job_info(job)
    assert info.get("JobState") == "COMPLETED", text[-4000:]
    assert (info.get("NumNodes"), info.get("NumTasks")) == (str(nodes), str(nodes * tasks_per_node))
    runs = list((logs / "train" / "runs").iterdir())
    assert [r.name for r in runs] == [f"slurm-{job}"]  # every rank on every node, one run directory
    assert "distributed_backend=gloo" in text and "All distributed processes registered" in text
    assert "MEMBER: 2/2" in text
    run = runs[0]
    result = json.loads((run / "metrics.json").read_text())
    evaluated = tmp_path / "eval"
    one = subprocess.run(
        [sys.executable, "-m", "vss.eval", f"ckpt_path={run}/checkpoints/last.ckpt", f"hydra.run.dir={evaluated}"],
        cwd=REPO_ROOT,
        env={k: v for k, v in cli_env.items() if not k.startswith("SLURM_")},
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert one.returncode == 0, one.stderr[-4000:]
    single = json.loads((evaluated / "metrics.json").read_text())
    assert result["step"] == 4
    for key in ("mIoU", "fwIoU", "mVC8", "mVC16"):
        assert single[key] == pytest.approx(result["val"][key], abs=1e-6), key
    print(
        f"[test] DDP job {job} ({nodes} node(s) x {tasks_per_node} task(s), nodes {info.get('NodeList')}): {run}; "
        f"val {result['val']['mIoU']:.6f} = one process {single['mIoU']:.6f}"
    )


def test_requeued_sbatch_job_resumes_from_its_checkpoint(
    slurm: None, cli_env: dict[str, str], tiny_args: Callable, tmp_path: Path
) -> None:
    logs, total = tmp_path / "logs", 120
    run = " ".join(
        [
            *tiny_args(logs),
            f"trainer.max_steps={total}",
            f"trainer.val_check_interval={total // 2}",
            "callbacks.progress_bar.refresh_rate=1",
        ]
    )
    script = f"""#!/bin/bash
#SBATCH --job-name=vss-requeue
#SBATCH --ntasks=1
#SBATCH --requeue
#SBATCH --signal=USR1@90
#SBATCH --open-mode=append
#SBATCH --output={tmp_path}/%j.out
srun {sys.executable} -m vss.train {run}
"""
    job = sbatch(script, tmp_path / "requeue.sh", cli_env)
    log = tmp_path / f"{job}.out"
    signal_when(job, log, total, at_least=3)
    wait_gone(job)
    info = job_info(job)
    assert (info.get("JobState"), info.get("Restarts")) == ("COMPLETED", "1"), log.read_text()[-4000:]
    check_resumed_once(log.read_text(errors="replace"), job, logs / "train" / "runs" / f"slurm-{job}", total)


def test_requeued_submitit_ddp_job_resumes_in_its_sweep_directory(
    submitit: None, start_cli: Callable, tiny_args: Callable, tmp_path: Path
) -> None:
    if not any(cpus >= 2 for cpus in slurm_nodes().values()):
        pytest.skip(f"needs an idle node with 2 CPUs (have {slurm_nodes()}): {START}")
    logs, total = tmp_path / "logs", 200
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "hydra/launcher=slurm"]
    more = [f"trainer.max_steps={total}", f"trainer.val_check_interval={total // 2}"]
    proc = start_cli("-m", *ddp, *tiny_args(logs), *more, "callbacks.progress_bar.refresh_rate=1", "seed=5")
    end = time.monotonic() + JOB_TIMEOUT_S
    # one sweep point: a plain job (not an array), its tasks' logs .submitit/<job>/<job>_<rank>_log.err
    pattern = "train/multiruns/*/.submitit/*/*_0_log.err"
    while not [p for p in logs.glob(pattern) if p.name == f"{p.parent.name}_0_log.err"]:
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < end, "the submitit job did not start"
        time.sleep(0.5)
    (rank0,) = [p for p in logs.glob(pattern) if p.name == f"{p.parent.name}_0_log.err"]
    job, sweep = rank0.parent.name, rank0.parents[2]
    signal_when(job, rank0.with_suffix(".out"), total, at_least=3)  # submitit's stdout log: the progress bar
    wait_gone(job)
    out, err = proc.communicate(timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, err[-4000:]
    info = job_info(job)
    assert (info.get("JobState"), info.get("Restarts"), info.get("NumTasks")) == ("COMPLETED", "1", "2")
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".") and p.is_dir()) == ["0"]
    check_resumed_once(rank0.with_suffix(".out").read_text(errors="replace"), job, sweep / "0", total)
