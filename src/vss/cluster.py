"""SLURM and launcher facts: job detection, requeue, the submitit launcher's task counts, DDP inside sweeps."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from vss.errors import ConfigError, friendly_errors


def slurm_job(env: Any = None) -> bool:
    """Whether this process is a task of a SLURM job step, as Lightning's ``SLURMEnvironment.detect`` decides
    (``SLURM_NTASKS`` set, job name not ``bash``/``interactive``): Lightning then starts no ranks itself."""
    env = os.environ if env is None else env
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def slurm_run_name(env: Any = None) -> str | None:
    """``slurm-<job>[_<array task>][-step<N>]`` inside a SLURM job (every rank and a requeued job agree), else None."""
    env = os.environ if env is None else env
    if not slurm_job(env) or not env.get("SLURM_JOB_ID"):
        return None
    step = env.get("SLURM_STEP_ID", "")
    return f"slurm-{slurm_job_id(env)}" + (f"-step{step}" if step.isdigit() and step != "0" else "")


SLURM_REQUEUE_SIGNAL = "USR1"
"""The signal SLURM sends before the time limit (``--signal=USR1@90``, ``hydra/launcher=slurm``): vss saves
``last.ckpt`` and requeues the job; submitit's own handler (USR2) and Lightning's auto-requeue stay unused."""


def slurm_restart_count(env: Any = None) -> int:
    """How often SLURM restarted this job (``SLURM_RESTART_COUNT``: requeue, preemption, node failure); 0 outside."""
    env = os.environ if env is None else env
    count = str(env.get("SLURM_RESTART_COUNT", "0")) if slurm_job(env) else "0"
    return int(count) if count.isdigit() else 0


def slurm_requeue_checkpoint(cfg: DictConfig, env: Any = None) -> Path | None:
    """A requeued SLURM job's own ``paths.output_dir/checkpoints/last.ckpt`` (the run directory is named after the
    job, or is its submitit sweep job's): what the restarted job resumes from; None on a first start, with an
    explicit ``ckpt_path`` or without a checkpoint."""
    if slurm_restart_count(env) == 0 or cfg.get("ckpt_path") is not None:
        return None
    last = Path(str(cfg.paths.output_dir)) / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None


def slurm_job_id(env: Any = None) -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task (submitit sweeps), else the job."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    job = env.get("SLURM_JOB_ID")
    if not job:
        raise ConfigError("SLURM_JOB_ID is not set: requeueing needs a SLURM job")
    return str(job)


def slurm_requeue(env: Any = None) -> str:
    """``scontrol requeue`` this job (SLURM restarts it; it resumes from its ``last.ckpt``); returns the job id."""
    import subprocess

    job = slurm_job_id(env)
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}")
    return job


def check_slurm_launcher(cfg: DictConfig) -> None:
    """A submitit launcher's task counts must be the trainer's (Lightning refuses to start otherwise): say so at
    submission, not in every job; ``hydra/launcher=slurm`` takes both from the trainer."""
    launcher = OmegaConf.select(cfg, "hydra.launcher", default=None)
    if launcher is None or "submitit" not in str(launcher.get("_target_", "")):
        return
    pairs = (("tasks_per_node", "trainer.devices"), ("nodes", "trainer.num_nodes"))
    for key, trainer_key in pairs:
        value, wanted = launcher.get(key), OmegaConf.select(cfg, trainer_key, default=1)
        if isinstance(wanted, int) and value is not None and int(value) != wanted:
            raise ConfigError(
                f"hydra.launcher.{key}={value} is invalid: expected {wanted}, the value of {trainer_key} (one task per "
                f"device; Lightning refuses other counts): use hydra/launcher=slurm, which takes both from the trainer"
            )


class SlurmLauncherCheck(HydraCallback):
    """Hydra callback: :func:`check_slurm_launcher` when a ``-m`` sweep starts, before any job is submitted."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check the launcher's task counts; a clear ``error:`` line and exit status 2 when they differ."""
        friendly_errors(check_slurm_launcher)(config)


def check_ddp_multirun(cfg: DictConfig, multirun: bool, env: Any = None) -> None:
    """Plain ``strategy=ddp`` re-launches the script per rank and cannot run inside ``-m``; say what to do.

    A SLURM job (one srun task per device, e.g. ``hydra/launcher=submitit_slurm``) is let through: Lightning starts
    no ranks there; its task counts must match ``trainer.devices`` / ``trainer.num_nodes``."""
    env = os.environ if env is None else env
    strategy = str(OmegaConf.select(cfg, "trainer.strategy", default="auto"))
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    many = (isinstance(devices, int) and devices > 1) or isinstance(devices, list | str) and devices not in (1, "1")
    if slurm_job(env):
        nodes = OmegaConf.select(cfg, "trainer.num_nodes", default=1)
        pairs = (("trainer.devices", devices, "SLURM_NTASKS_PER_NODE"), ("trainer.num_nodes", nodes, "SLURM_NNODES"))
        for key, value, var in pairs:
            if env.get(var) is not None and isinstance(value, int) and str(value) != env[var]:
                raise ConfigError(f"{key}={value} is invalid: expected {env[var]}, the job's {var}")
        return
    if multirun and strategy == "ddp" and many:
        raise ConfigError(
            "trainer.strategy=ddp cannot run inside a Hydra multirun (-m): Lightning re-launches the script per "
            "rank. Use trainer=ddp_spawn for sweeps, or launch each run of the sweep on its own without -m."
        )


SUBMITIT_LAUNCHERS = ("slurm", "slurm_gpu", "submitit_slurm", "submitit_local")
"""``hydra/launcher=`` options that need the extra ``slurm`` (hydra-submitit-launcher)."""


def _submitit_plugin_installed() -> bool:
    import importlib.util

    try:  # find_spec imports the parent package: no hydra_plugins at all raises
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


def check_launcher_installed(argv: Sequence[str]) -> None:
    """A submitit launcher without its plugin is one line saying how to install it (Hydra's own message names
    neither the package nor the extra)."""
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "hydra/launcher" and value in SUBMITIT_LAUNCHERS and not _submitit_plugin_installed():
            raise ConfigError(
                f"hydra/launcher={value} needs hydra-submitit-launcher, which is not installed: "
                "pip install -e '.[slurm]' (or pip install 'vss[slurm]')"
            )
