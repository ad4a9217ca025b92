"""The real training CLI (``python -m vss.train``) as a subprocess on the tiny synthetic dataset: outputs,
unique run directories, resume, DDP on CPU (gloo), Hydra multirun, W&B offline; and atomic checkpoints."""

from __future__ import annotations

import csv
import json
import re
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from vss.checkpoint import AtomicCheckpointIO, atomic_torch_save
from vss.errors import ConfigError

SUMMARY = ("mIoU", "fwIoU", "mVC8", "mVC16", "flicker")
RUN_DIR_RE = re.compile(r"^\[vss\] run directory: (.+)$", re.MULTILINE)
STEP_RE = re.compile(r"^\[vss\] step (\d+): (.*)$", re.MULTILINE)


# -- helpers -----------------------------------------------------------------------------------------
def report(proc: subprocess.CompletedProcess) -> str:
    """Exit code and output tails of a finished process, for assertion messages."""
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-5000:]}\n--- stderr ---\n{proc.stderr[-5000:]}"


def run_dirs(stdout: str) -> list[Path]:
    """The run directories the CLI printed, one per finished job."""
    return [Path(p.strip()) for p in RUN_DIR_RE.findall(stdout)]


def only_run_dir(proc: subprocess.CompletedProcess) -> Path:
    """The run directory of a successful single run."""
    assert proc.returncode == 0, report(proc)
    dirs = run_dirs(proc.stdout)
    assert len(dirs) == 1, report(proc)
    return dirs[0]


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def read_csv(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def assert_same_metrics(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-6) -> None:
    """Every scalar metric and every per-class IoU of ``a`` equals ``b`` within ``tol``."""
    scalars = sorted(k for k, v in a.items() if isinstance(v, float))
    assert set(SUMMARY) <= set(scalars)
    assert scalars == sorted(k for k, v in b.items() if isinstance(v, float))
    for k in scalars:
        assert a[k] == pytest.approx(b[k], abs=tol), k
    assert a["per_class_iou"].keys() == b["per_class_iou"].keys()
    for name, v in a["per_class_iou"].items():
        w = b["per_class_iou"][name]
        assert (v is None and w is None) or v == pytest.approx(w, abs=tol), name


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of an offline W&B run file (``run-<id>.wandb``: a 7-byte ``:W&B`` header, then
    LevelDB log records -- crc32, length, type -- in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first start a record, middle/last extend
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def wandb_run(run_dir: Path) -> dict[str, Any]:
    """The single offline W&B run under ``run_dir``: its id, final summary and whether it was finished."""
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline W&B run in {run_dir}, found {runs}"
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1, sorted(runs[0].iterdir())
    summary, finished = {}, False
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "exit":
            finished = True
    summary_json = runs[0] / "files" / "wandb-summary.json"
    if summary_json.is_file():  # some wandb versions write it in offline mode too
        summary |= json.loads(summary_json.read_text())
    return {"id": runs[0].name.rsplit("-", 1)[-1], "summary": summary, "finished": finished}


# -- the default job, twice at the same time --------------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(start_cli, tiny_args, tmp_path_factory) -> tuple[list[subprocess.CompletedProcess], Path]:
    """The tiny default job started twice at once, logging into the same folder, the second one to W&B
    (offline) and TensorBoard as well; (processes, log dir)."""
    log_dir = tmp_path_factory.mktemp("pair") / "logs"
    procs = [start_cli(*tiny_args(log_dir)), start_cli(*tiny_args(log_dir), "logger=[csv,wandb,tensorboard]")]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=420)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done, log_dir


def test_default_job_outputs(two_runs):
    proc = two_runs[0][0]
    run_dir = only_run_dir(proc)

    steps = STEP_RE.findall(proc.stdout)
    assert len(steps) == 1 and steps[0][0] == "4", report(proc)
    line = steps[0][1]
    for key in SUMMARY:
        assert re.search(rf"\b{key} \d\.\d{{4}}\b", line), line
    assert "val mIoU" in line

    metrics = read_metrics(run_dir)
    assert metrics["step"] == 4
    best = metrics["best"]  # the summary names the best checkpoint and its metrics
    assert best["ckpt_path"] == str(next((run_dir / "checkpoints").glob("best-*.ckpt")))
    assert best["step"] == ckpt_step(Path(best["ckpt_path"])) and best["step"] in (2, 4)
    assert re.search(
        rf"^\[vss\] best checkpoint: {re.escape(best['ckpt_path'])} \(step {best['step']}: val mIoU", proc.stdout, re.M
    )
    for key in (*SUMMARY, "pixel_accuracy"):
        value = metrics["val"][key]
        assert isinstance(value, float) and 0.0 <= value <= 1.0, (key, value)
    for key in SUMMARY:  # the printed line reports the same numbers
        assert f"{key} {metrics['val'][key]:.4f}" in line
    assert len(metrics["val"]["per_class_iou"]) == 5

    ckpts = run_dir / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    assert ckpt_step(ckpts / "last.ckpt") == 4
    best = list(ckpts.glob("best-*.ckpt"))
    assert len(best) == 1, list(ckpts.iterdir())
    assert not list(ckpts.glob("*.tmp")), "a temporary checkpoint file was left behind"

    pngs = sorted((run_dir / "overlays").rglob("*.png"))
    assert pngs and {p.parent.name for p in pngs} == {"step0000002", "step0000004"}
    assert len({p.name.split("_")[1] for p in pngs}) == 2  # spread over both validation videos
    with Image.open(pngs[0]) as im:  # frame | prediction | truth side by side, a legend below
        assert im.size[0] == 3 * 32 and im.size[1] > 32

    rows = read_csv(run_dir)
    val = [r for r in rows if r.get("val/mIoU")]
    assert [int(r["step"]) for r in val] == [2, 4]  # the step of the weights, as checkpoints and overlays say
    assert float(val[-1]["val/mIoU"]) == pytest.approx(metrics["val"]["mIoU"], abs=1e-6)
    for name, iou in metrics["val"]["per_class_iou"].items():  # per-class IoU is logged too
        logged = val[-1][f"val/iou/{name}"]
        assert (float(logged) if logged else None) == (None if iou is None else pytest.approx(iou, abs=1e-6))

    log = (run_dir / "train.log").read_text()  # the run's log: config summary, validations, summary
    assert "[vss] train experiment=synthetic" in log and "config:\n" in log
    assert "[vss] validation at step 2: mIoU" in log and "[vss] validation at step 4: mIoU" in log
    assert f"[vss] step 4: {line}" in log and f"[vss] run directory: {run_dir}" in log

    out = proc.stdout + proc.stderr  # quiet: no tips, no FLOPs column, no deprecation noise; a step bar
    for noise in ("Tip:", "FLOPs", "Total Flops", "LeafSpec", "sync_dist", "Epoch 0"):
        assert noise not in out, noise
    assert re.search(r"step: 100%\|.*\| 4/4 ", out), out[-2000:]
    assert len([r for r in rows if r.get("train/loss")]) == 4
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_final_validation_equals_vss_eval_of_the_last_checkpoint(two_runs, tmp_path):
    """The job validates twice (steps 2 and 4): the step-4 figures are those of its last.ckpt evaluated on its own
    (no state carried over from the first validation, e.g. the folded decoder's cache)."""
    from vss.eval import evaluate_checkpoint

    run_dir = only_run_dir(two_runs[0][0])
    trained = read_metrics(run_dir)
    assert trained["step"] == 4
    cfg = OmegaConf.load(Path(__file__).parents[1] / "src" / "vss" / "conf" / "eval.yaml")
    del cfg["defaults"]
    cfg.merge_with({"ckpt_path": str(run_dir / "checkpoints" / "last.ckpt"), "num_workers": 0, "progress": False})
    evaluated = evaluate_checkpoint(cfg, tmp_path)
    assert_same_metrics(trained["val"], {k: v for k, v in evaluated.items() if k != "seconds"})


def test_concurrent_runs_get_unique_run_dirs(two_runs):
    procs, log_dir = two_runs
    dirs = [only_run_dir(p) for p in procs]
    assert dirs[0] != dirs[1]
    assert sorted(p.name for p in (log_dir / "train" / "runs").iterdir()) == sorted(d.name for d in dirs)
    for d in dirs:
        assert read_metrics(d)["step"] == 4
        assert (d / "checkpoints" / "last.ckpt").is_file()


def test_wandb_offline_run(two_runs):
    run_dir = only_run_dir(two_runs[0][1])
    run = wandb_run(run_dir)
    assert run["id"]
    assert run["finished"], "wandb.finish() was not called"
    summary, metrics = run["summary"], read_metrics(run_dir)["val"]
    for key in SUMMARY:
        assert summary[f"val/{key}"] == pytest.approx(metrics[key], abs=1e-6)  # logged as float32
    assert (run_dir / "csv" / "metrics.csv").is_file()  # the other logger of the list still writes
    assert not (only_run_dir(two_runs[0][0]) / "wandb").exists()  # logger=csv (the default) does not
    assert "anonymous" not in two_runs[0][1].stderr  # no W&B deprecation noise


def test_tensorboard_gets_metrics_at_the_right_step_overlays_and_per_class_iou(two_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = only_run_dir(two_runs[0][1])
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert [e.step for e in events.Scalars("val/mIoU")] == [2, 4]
    assert events.Scalars("val/mIoU")[-1].value == pytest.approx(read_metrics(run_dir)["val"]["mIoU"], abs=1e-6)
    assert {t for t in tags["scalars"] if t.startswith("val/iou/")} <= {
        f"val/iou/{n}" for n in ("background", "red", "green", "blue", "yellow")
    }
    assert any(t.startswith("val/iou/") for t in tags["scalars"])
    overlays = [t for t in tags["images"] if t.startswith("val/overlays/")]
    assert overlays and sorted({e.step for t in overlays for e in events.Images(t)}) == [2, 4]


def test_resume_continues_from_the_checkpoint(two_runs, run_cli, tmp_path):
    import shutil

    first = tmp_path / "run"  # a copy: the other tests read the original
    shutil.copytree(only_run_dir(two_runs[0][0]), first)
    last = first / "checkpoints" / "last.ckpt"
    proc = run_cli("trainer.max_steps=6", f"ckpt_path={last}")  # the stored config: the tiny job, not the default
    run_dir = only_run_dir(proc)
    assert run_dir == first  # the same run directory
    assert (
        f"resuming from {last} (step 4) with its stored config; command-line overrides: trainer.max_steps=6 (was 4)"
        in proc.stdout
    )
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr
    assert re.search(r"^\[vss\] step 6: val mIoU", proc.stdout, re.MULTILINE), report(proc)

    assert read_metrics(run_dir)["step"] == 6
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 6
    rows = read_csv(run_dir)
    train_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert train_steps == [0, 1, 2, 3, 4, 5], "the rows before the resume are kept; it trains steps 4 and 5 only"
    assert [int(r["step"]) for r in rows if r.get("val/mIoU")] == [2, 4, 6]
    assert {p.parent.name for p in (run_dir / "overlays").rglob("*.png")} == {
        "step0000002",
        "step0000004",
        "step0000006",
    }
    assert "resuming from" in (run_dir / "train.log").read_text()


def test_resume_continues_the_wandb_run(two_runs, run_cli, tmp_path):
    import shutil

    first = tmp_path / "run"
    shutil.copytree(only_run_dir(two_runs[0][1]), first)  # the job that logged to W&B (offline)
    started = wandb_run(first)["id"]
    proc = run_cli("trainer.max_steps=6", f"ckpt_path={first}/checkpoints/last.ckpt")
    assert proc.returncode == 0, report(proc)
    assert f"[vss] W&B: continuing run {started}" in proc.stdout, report(proc)
    runs = sorted((first / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[-1] for r in runs} == {started}  # one W&B run, two sessions


def test_resume_refuses_a_checkpoint_of_another_model(two_runs, compose_cfg, tiny_args, tmp_path) -> None:
    from vss.lit import build_module
    from vss.stages import check_resume_model, prepare_resume

    last = only_run_dir(two_runs[0][0]) / "checkpoints" / "last.ckpt"
    cfg = compose_cfg(*tiny_args(tmp_path), f"ckpt_path={last}", "model.embed_dim=16")
    cfg.paths.output_dir = str(last.parents[1])  # as Hydra sets it for a resume
    resume = prepare_resume(cfg, ["model.embed_dim=16"], {"model"})
    assert resume.step == 4 and resume.changes == ["model.embed_dim=16 (was 32)"]
    module = build_module(resume.config, 5, list("abcde"))
    with pytest.raises(ConfigError) as info:
        check_resume_model(module, resume)
    msg = str(info.value)
    assert "\n" not in msg and str(last) in msg and "after the overrides model.embed_dim=16 (was 32)" in msg
    assert re.search(r"aggregator\.decode_head\.\S+: checkpoint \(32, .*\) vs model \(16, ", msg), msg
    cfg = compose_cfg(*tiny_args(tmp_path), f"ckpt_path={last}")
    cfg.paths.output_dir = str(last.parents[1])
    same = prepare_resume(cfg)
    check_resume_model(build_module(same.config, 5, list("abcde")), same)  # the stored config fits


# -- DDP on CPU ---------------------------------------------------------------------------------------
# 3 validation videos of 17 frames: 51 frames do not split evenly over 2 ranks, so a padding sampler would
# duplicate a frame, an interleaving one would break the videos, and averaging per-rank metric values
# (2 videos on one rank, 1 on the other) would not give the pooled numbers.
DDP_DATA = (
    "data.synthetic.train_videos=2",
    "data.synthetic.val_videos=3",
    "++data.synthetic.min_frames=17",
    "++data.synthetic.max_frames=17",
    "data.synthetic.height=32",
    "data.synthetic.width=32",
)


def test_ddp_cpu_matches_single_process_validation(run_cli, make_data_dir, compose_cfg, tiny_args, tmp_path):
    from vss.data.vspw import read_split

    data_dir = make_data_dir(*DDP_DATA)
    # val_batch_size=1: every frame is computed alone in both runs, whatever the sharding; 2 steps, 1 validation
    args = [
        *tiny_args(tmp_path / "logs"),
        *DDP_DATA,
        f"paths.data_dir={data_dir}",
        "data.val_batch_size=1",
        "trainer.max_steps=2",
    ]
    assert sum(len(v) for v in read_split(Path(compose_cfg(*args).data.root), "val")) == 51

    proc = run_cli(*args, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    ddp_dir = only_run_dir(proc)
    out = proc.stdout + proc.stderr
    assert "MEMBER: 2/2" in out, report(proc)  # rank 1 really ran
    assert OmegaConf.load(ddp_dir / ".hydra" / "config.yaml").trainer.sync_batchnorm is True  # not overridden
    assert [p.name for p in (tmp_path / "logs" / "train" / "runs").iterdir()] == [ddp_dir.name]  # one shared dir
    ddp = read_metrics(ddp_dir)
    assert ddp["step"] == 2
    last = ddp_dir / "checkpoints" / "last.ckpt"
    assert ckpt_step(last) == 2

    # the same weights validated by one process: resuming at max_steps trains nothing and validates (debug=tiny is
    # not retyped: a group that sets keys across the config is refused when resuming; the checkpoint stores them)
    single = run_cli(*(a for a in args if a != "debug=tiny"), "trainer=cpu", f"ckpt_path={last}")
    assert "command-line overrides: trainer=cpu" in single.stdout, report(single)
    assert only_run_dir(single) == ddp_dir
    ref = read_metrics(ddp_dir)
    assert ref["step"] == 2
    assert_same_metrics(ddp["val"], ref["val"])


# -- Hydra multirun -------------------------------------------------------------------------------------
def test_multirun_sweep_runs_every_job_with_its_own_wandb_run(run_cli, tiny_overrides, tmp_path):
    proc = run_cli("-m", *tiny_overrides, "logger=[csv,wandb]", "optim.optimizer.lr=1e-3,2e-3")
    assert proc.returncode == 0, report(proc)
    sweeps = list((tmp_path / "logs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    assert sorted(run_dirs(proc.stdout)) == jobs
    assert len(STEP_RE.findall(proc.stdout)) == 2
    lrs = []
    for job in jobs:
        metrics = read_metrics(job)
        assert metrics["step"] == 4
        assert (job / "checkpoints" / "last.ckpt").is_file()
        lrs.append(OmegaConf.load(job / ".hydra" / "config.yaml").optim.optimizer.lr)
    assert lrs == [1e-3, 2e-3]
    table = (sweeps[0] / "sweep.md").read_text()  # overrides -> metrics, the best job marked
    best = max((0, 1), key=lambda j: read_metrics(jobs[j])["val"]["mIoU"])
    for j, lr in enumerate(("0.001", "0.002")):  # as Hydra writes the swept values
        m = read_metrics(jobs[j])["val"]
        row = f"| {j} | {lr} | {100 * m['mIoU']:.1f} | {100 * m['mVC8']:.1f} | {'*' if j == best else ''} |"
        assert row in table, table
    assert (sweeps[0] / "sweep.csv").is_file() and "[vss] sweep of 2 jobs" in proc.stdout

    # W&B: wandb.finish() between jobs, so each job has its own finished offline run with its own numbers
    runs = [wandb_run(job) for job in jobs]
    assert runs[0]["id"] != runs[1]["id"], "the second job reused the first job's W&B run"
    for job, run in zip(jobs, runs, strict=True):
        assert run["finished"], "wandb.finish() was not called"
        assert run["summary"]["val/mIoU"] == pytest.approx(read_metrics(job)["val"]["mIoU"], abs=1e-6)


def test_multirun_with_plain_ddp_is_refused_at_once(run_cli, tiny_overrides, tmp_path):
    start = time.monotonic()
    proc = run_cli(
        "-m",
        *tiny_overrides,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "optim.optimizer.lr=1e-3,2e-3",
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, report(proc)
    assert "ddp_spawn" in proc.stderr, report(proc)
    assert "[vss] step" not in proc.stdout
    assert "MEMBER:" not in proc.stdout + proc.stderr  # no rank was started
    assert not list((tmp_path / "logs").rglob("*.ckpt"))
    assert elapsed < 60, f"took {elapsed:.0f} s to refuse"


@pytest.mark.slow
def test_multirun_with_ddp_spawn(run_cli, tiny_overrides, tmp_path):
    proc = run_cli(
        "-m",
        *tiny_overrides,
        "trainer=ddp_spawn",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "optim.optimizer.lr=1e-3,2e-3",
    )
    assert proc.returncode == 0, report(proc)
    jobs = run_dirs(proc.stdout)
    assert len(jobs) == 2 and jobs[0] != jobs[1]
    assert len(STEP_RE.findall(proc.stdout)) == 2
    for job in jobs:
        metrics = read_metrics(job)
        assert metrics["step"] == 4  # from rank 0 of the spawned workers, not the idle main process
        for key in SUMMARY:
            assert 0.0 <= metrics["val"][key] <= 1.0
        assert len(metrics["val"]["per_class_iou"]) == 5
        assert ckpt_step(job / "checkpoints" / "last.ckpt") == 4


# -- atomic checkpoints --------------------------------------------------------------------------------------
def _crashing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    f.write(b"PK\x03\x04 half a checkpoint")
    raise OSError("No space left on device")


@pytest.mark.parametrize("save", ["atomic_torch_save", "AtomicCheckpointIO"])
def test_crash_during_save_keeps_the_old_checkpoint(save, tmp_path, monkeypatch):
    def write(obj: dict[str, Any], path: Path) -> None:
        if save == "atomic_torch_save":
            atomic_torch_save(obj, path)
        else:
            AtomicCheckpointIO().save_checkpoint(obj, path)

    path = tmp_path / "checkpoints" / "last.ckpt"
    write({"global_step": 4, "w": torch.arange(6.0)}, path)
    before = path.read_bytes()

    monkeypatch.setattr(torch, "save", _crashing_save)
    with pytest.raises(OSError, match="No space left"):
        write({"global_step": 6, "w": torch.zeros(6)}, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 4 and torch.equal(loaded["w"], torch.arange(6.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"], "a temporary file was left behind"

    write({"global_step": 6, "w": torch.zeros(6)}, path)  # and a save that works replaces it
    assert torch.load(path, weights_only=True)["global_step"] == 6
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_interrupted_save_leaves_no_temp_file(tmp_path, monkeypatch):
    def interrupted(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    path = tmp_path / "best.ckpt"
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"x": 1}, path)
    assert not list(tmp_path.iterdir())
