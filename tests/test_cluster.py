"""Fast checks of the SLURM pieces: one run directory per job (every rank, a requeue), the DDP-multirun check,
the launcher presets' task counts, the requeue signal and the restarted job's checkpoint, W&B sweep naming.
The real-SLURM checks are tests/test_slurm.py (slow)."""

from __future__ import annotations

import importlib.util
import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import vss.cluster
from vss.cluster import (
    check_ddp_multirun,
    check_slurm_launcher,
    slurm_job,
    slurm_job_id,
    slurm_requeue_checkpoint,
    slurm_restart_count,
    slurm_run_name,
)
from vss.config import CONF_DIR, override_tags, register_resolvers
from vss.errors import ConfigError

JOB = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train", "SLURM_NTASKS_PER_NODE": "2"}


def ddp(devices: int = 2) -> DictConfig:
    return OmegaConf.create({"trainer": {"strategy": "ddp", "devices": devices, "num_nodes": 1}})


def test_every_rank_and_a_requeue_share_the_run_name() -> None:
    ranks = [JOB | {"SLURM_PROCID": str(r), "SLURM_STEP_ID": "0"} for r in range(2)]
    requeued = ranks[0] | {"SLURM_RESTART_COUNT": "1"}
    assert {slurm_run_name(e) for e in [*ranks, requeued]} == {"slurm-4242"}
    assert slurm_run_name(JOB | {"SLURM_STEP_ID": "3"}) == "slurm-4242-step3"
    assert slurm_run_name(JOB | {"SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1"}) == "slurm-7_1"


def test_outside_slurm_or_interactive_keeps_the_unique_name() -> None:
    assert slurm_run_name({}) is None
    assert not slurm_job(JOB | {"SLURM_JOB_NAME": "interactive"})
    assert slurm_run_name(JOB | {"SLURM_JOB_NAME": "bash"}) is None


def test_ddp_multirun_stopped_locally_let_through_on_slurm() -> None:
    with pytest.raises(ConfigError, match="multirun"):
        check_ddp_multirun(ddp(), multirun=True, env={})
    check_ddp_multirun(ddp(), multirun=True, env=JOB)
    check_ddp_multirun(ddp(), multirun=False, env={})


def test_slurm_task_count_must_match_devices() -> None:
    with pytest.raises(ConfigError, match=r"trainer.devices=4 is invalid: expected 2, the job's SLURM_NTASKS_PER_NODE"):
        check_ddp_multirun(ddp(4), multirun=True, env=JOB)
    with pytest.raises(ConfigError, match="trainer.num_nodes=1 is invalid: expected 2"):
        check_ddp_multirun(ddp(), multirun=False, env=JOB | {"SLURM_NNODES": "2"})


def test_launcher_presets_take_task_counts_from_the_trainer() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    register_resolvers()
    overrides = ["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cpu = compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
        gpu = compose("train", overrides=["hydra/launcher=slurm_gpu", *overrides], return_hydra_config=True)
    launcher = cpu.hydra.launcher
    assert (launcher.tasks_per_node, launcher.nodes, launcher.gpus_per_node) == (4, 2, None)
    assert (launcher.additional_parameters.signal, launcher.max_num_timeout) == ("USR1@90", 0)
    assert (gpu.hydra.launcher.tasks_per_node, gpu.hydra.launcher.gpus_per_node) == (4, 4)
    check_slurm_launcher(cpu)


def test_submitit_task_counts_that_differ_from_the_trainer_are_refused() -> None:
    target = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    cfg = OmegaConf.create(
        {"hydra": {"launcher": {"_target_": target, "tasks_per_node": 1, "nodes": 1}}, "trainer": {"devices": 4}}
    )
    with pytest.raises(ConfigError, match=r"hydra.launcher.tasks_per_node=1 is invalid: expected 4, .*trainer.devices"):
        check_slurm_launcher(cfg)
    cfg.hydra.launcher.tasks_per_node, cfg.trainer.num_nodes = 4, 2
    with pytest.raises(ConfigError, match=r"hydra.launcher.nodes=1 is invalid: expected 2"):
        check_slurm_launcher(cfg)
    cfg.hydra.launcher._target_ = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    check_slurm_launcher(cfg)  # not a submitit launcher: nothing to agree with


def test_only_a_restarted_job_resumes_from_its_own_last_checkpoint(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"ckpt_path": None, "paths": {"output_dir": str(tmp_path)}})
    restarted = JOB | {"SLURM_RESTART_COUNT": "1"}
    assert (slurm_restart_count(JOB), slurm_restart_count(restarted), slurm_restart_count({})) == (0, 1, 0)
    assert slurm_requeue_checkpoint(cfg, restarted) is None  # no checkpoint written before the requeue
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert slurm_requeue_checkpoint(cfg, restarted) == last
    assert slurm_requeue_checkpoint(cfg, JOB) is None  # a first start never picks up a checkpoint
    assert slurm_requeue_checkpoint(cfg, {"SLURM_RESTART_COUNT": "1"}) is None  # not a SLURM task
    cfg.ckpt_path = "/elsewhere/last.ckpt"
    assert slurm_requeue_checkpoint(cfg, restarted) is None  # an explicit resume wins


def test_requeue_id_of_an_array_task() -> None:
    assert slurm_job_id(JOB) == "4242"
    assert slurm_job_id(JOB | {"SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1"}) == "7_1"
    with pytest.raises(ConfigError, match="SLURM_JOB_ID"):
        slurm_job_id({})


def test_requeue_signal_stops_training_then_rank_zero_requeues(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from vss.callbacks import RequeueOnSignal, slurm_plugins

    kills: list[int] = []
    requeues: list[str] = []
    monkeypatch.setattr("os.kill", lambda pid, sig: kills.append(sig))
    monkeypatch.setattr(vss.cluster, "slurm_requeue", lambda: requeues.append("4242") or "4242")
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    trainer = SimpleNamespace(is_global_zero=True, global_step=7)
    callback = RequeueOnSignal()
    callback._on_signal(signal.SIGUSR1, None)  # during setup / the final validation: ignored
    assert (kills, callback.requested) == ([], False)
    callback.on_train_start(trainer, None)  # type: ignore[arg-type]
    callback._on_signal(signal.SIGUSR1, None)
    callback._on_signal(signal.SIGUSR1, None)  # a second signal: one stop, one requeue
    assert kills == [signal.SIGTERM] and callback.requested
    callback.on_exception(trainer, None, ValueError("not a stop"))  # type: ignore[arg-type]
    assert requeues == []
    callback.on_exception(trainer, None, SIGTERMException())  # type: ignore[arg-type]
    assert requeues == ["4242"]
    other_rank = RequeueOnSignal()
    other_rank.requested = True
    other_rank.on_exception(SimpleNamespace(is_global_zero=False), None, SIGTERMException())  # type: ignore[arg-type]
    assert requeues == ["4242"]
    for key, value in JOB.items():
        monkeypatch.setenv(key, value)
    (env,) = slurm_plugins()
    assert not env.auto_requeue  # Lightning's own requeue (hpc_ckpt_*.ckpt) stays off: one mechanism


def test_run_dir_is_the_slurm_job_inside_a_job(monkeypatch: pytest.MonkeyPatch) -> None:
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    local = str(cfg.hydra.run.dir)
    for key, value in (JOB | {"SLURM_STEP_ID": "0"}).items():
        monkeypatch.setenv(key, value)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert str(cfg.hydra.run.dir).endswith("/train/runs/slurm-4242")
    assert "slurm-" not in local and local.rsplit("/", 1)[0] == str(cfg.hydra.run.dir).rsplit("/", 1)[0]


@pytest.fixture
def hydra_config() -> Iterator[type]:
    """``HydraConfig`` for a test that sets it (as a Hydra job does), cleared afterwards: a config left behind
    would resolve ``${hydra:...}`` in later tests."""
    from hydra.core.hydra_config import HydraConfig

    yield HydraConfig
    HydraConfig.instance().cfg = None  # type: ignore[assignment]


def test_wandb_sweep_point_is_one_run_in_the_experiment_group(hydra_config: type) -> None:
    HydraConfig = hydra_config

    register_resolvers()
    overrides = ["logger=wandb", "experiment=mrcfa_table2_synthetic", "stm.p=0.5", "seed=3", "paths.log_dir=/x"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides, return_hydra_config=True)
        bare = compose("train", ["logger=wandb", "~experiment"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    wandb = cfg.logger.wandb
    assert (wandb.group, wandb.name, wandb.job_type) == ("mrcfa_table2_synthetic", "seed=3,stm.p=0.5", "train")
    assert list(wandb.tags) == ["mrcfa", "synthetic", "table2", "stm.p=0.5", "seed=3"]  # + the point's overrides
    HydraConfig.instance().set_config(bare)
    assert (bare.logger.wandb.group, bare.logger.wandb.name) == ("train", "train")  # no experiment, no overrides


def test_override_tags_skip_excluded_keys_and_fit_wandb() -> None:
    long = "data.root=/" + "x" * 80
    tags = override_tags(
        ["mrcfa"], ["++data.synthetic.min_frames=18", "seed=1", "~experiment", long, "seed=1"], ["experiment"]
    )
    assert tags == ["mrcfa", "++data.synthetic.min_frames=18", "seed=1", long[:64]]
    assert override_tags([], [], []) == []


def test_collect_reads_a_sweep_copied_from_a_cluster(
    collect: ModuleType, compose_cfg: Callable, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A submitit sweep as it comes back from a cluster: job directories, .submitit logs (symlinks that point at
    the cluster's paths), a job that did not finish, configs naming weights that exist only there."""
    sweep = tmp_path / "multirun"
    weights = "encoder.pretrained=/cluster/only/mit_b0.pth"
    for job, p in enumerate((0.5, 1.0)):
        cfg = compose_cfg("experiment=mrcfa_synthetic", f"stm.p={p}", weights, "paths.output_dir=x")
        (sweep / str(job) / ".hydra").mkdir(parents=True)
        (sweep / str(job) / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        hydra_yaml = OmegaConf.to_yaml({"hydra": {"job": {"id": f"7_{job}"}}})  # as Hydra writes it: '7_0'
        (sweep / str(job) / ".hydra" / "hydra.yaml").write_text(hydra_yaml)
        (sweep / ".submitit" / f"7_{job}").mkdir(parents=True)
        (sweep / ".submitit" / f"7_{job}" / f"7_{job}_0_log.err").write_text("")
    metrics = {"step": 20, "val": {"mIoU": 0.5, "mVC8": 0.9, "mVC16": 0.8}}
    (sweep / "0" / "metrics.json").write_text(json.dumps(metrics))  # job 1 was still running / failed
    (sweep / ".submitit" / ".submission_file_1.sh").symlink_to("/cluster/sweeps/.submitit/7/7_submission.sh")
    page = tmp_path / "table2.md"
    page.write_text("<!-- ours-synthetic:start -->\n<!-- ours-synthetic:end -->\n")  # an empty block
    (row,) = collect.collect_table("table2", [sweep], page, bench=False, plot=tmp_path / "t2.png").rows
    assert [r.path.name for r in row.runs] == ["0"] and row.params_m > 0  # no weights loaded for the count
    assert "| 50% |" in page.read_text() and "| 1 | 20 |" in page.read_text()
    out = capsys.readouterr().err  # collect.py's status lines go to stderr (the table to stdout)
    assert f"not collected: {sweep / '1'} (no metrics.json" in out and str(sweep / ".submitit/7_1/7_1_0_log.err") in out


def test_a_submitit_launcher_without_the_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:

    from vss.cli import check_command_line

    real = importlib.util.find_spec

    def no_plugins(name: str, *args: object) -> object:
        if name.startswith("hydra_plugins"):  # as where no Hydra plugin is installed: the parent package is missing
            raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", no_plugins)
    with pytest.raises(ConfigError, match=r"hydra/launcher=slurm needs hydra-submitit-launcher.*\.\[slurm\]"):
        check_command_line("train", ["-m", "hydra/launcher=slurm", "seed=1,2"])
    check_command_line("train", ["-m", "hydra/launcher=basic", "seed=1,2"])  # Hydra's own launcher: no extra


@pytest.mark.parametrize("in_job", [False, True])
def test_lightnings_srun_hint_is_quiet_outside_a_slurm_job(in_job: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where SLURM is installed (a login node), Lightning hints at srun on every run; inside a job it may matter."""
    import warnings

    from vss.callbacks import quiet_warnings

    if in_job:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
    else:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_warnings()
        warnings.warn("The `srun` command is available on your system but is not used. HINT: ...", stacklevel=1)
    assert len(caught) == int(in_job)
