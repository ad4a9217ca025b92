"""Training entry point: ``python -m vss.train [overrides]`` (also ``vss-train``).

The command line is checked before torch is imported (a mistyped key or a bad value fails in about a second);
``ckpt_path=RUN/checkpoints/last.ckpt`` resumes in ``RUN`` with the config stored in the checkpoint.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vss.cli import check_command_line, resume_arguments
from vss.cluster import check_ddp_multirun, slurm_job_id, slurm_requeue_checkpoint, slurm_restart_count
from vss.config import CONF_DIR, register_resolvers
from vss.errors import friendly_errors, print_error
from vss.runtime import tune_host_allocator
from vss.validation import check_model_values, check_pipeline_alone, check_train_values

log = logging.getLogger("vss.train")
RUN_LOG = logging.getLogger("vss.report")
"""Lines for the run's ``train.log`` only (conf/hydra/default.yaml gives it the file handler, not the console)."""
EXIT_SIGTERM = 128 + 15
LIGHTNING_CSV_LOGGER = "pytorch_lightning.loggers.CSVLogger"

register_resolvers()
_ARGV: list[str] = []


def say(message: str) -> None:
    """Print a ``[vss]`` line and write it to the run's ``train.log``."""
    print(message, flush=True)
    RUN_LOG.info(message)


def _instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every child with a ``_target_`` (callbacks, loggers)."""
    from hydra.utils import instantiate

    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def _stage_results(module: Any, trainer: Any, stage: str) -> dict[str, Any]:
    """The module's metrics of the last ``stage`` loop; rebuilt from callback_metrics when that loop ran in
    spawned workers (``ddp_spawn``), which leave this process's module untouched."""
    if module.last_metrics:
        return dict(module.last_metrics)
    cm = trainer.callback_metrics
    out: dict[str, Any] = {k.split("/", 1)[1]: float(v) for k, v in cm.items() if k.startswith(f"{stage}/")}
    out = {k: v for k, v in out.items() if "/" not in k}  # not the per-class val/iou/<class> scalars
    per_class = cm.get(f"vss/{stage}_per_class_iou")
    if per_class is not None:
        names = module.class_names
        out["per_class_iou"] = {n: None if math.isnan(v) else v for n, v in zip(names, per_class.tolist(), strict=True)}
    return out


def _on_cpu(cfg: DictConfig) -> bool:
    """Whether the trainer will run on CPU (``accelerator: cpu``, or ``auto`` without CUDA)."""
    import torch

    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def describe_run(cfg: DictConfig, choices: Mapping[str, Any]) -> str:
    """One line naming what a run trains: groups, steps, batch, learning rate, validation interval."""
    picked = " ".join(f"{g}={choices[g]}" for g in ("experiment", "data", "encoder", "model") if choices.get(g))
    if not picked:
        picked = f"model={str(cfg.model._target_).rsplit('.', 1)[-1]} encoder={cfg.encoder.name}"
    return (
        f"[vss] train {picked}: {cfg.trainer.max_steps} steps, batch {cfg.data.batch_size}, "
        f"lr {cfg.optim.optimizer.lr:g}, validation every {cfg.trainer.val_check_interval} steps, seed {cfg.seed}"
    )


def quiet_output() -> None:
    """Drop Lightning's product tips and known-harmless deprecation/sync notes; real warnings stay."""
    from vss.callbacks import quiet_warnings

    quiet_warnings()

    def no_tips(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")

    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logger = logging.getLogger(name)
        for handler in [*logger.handlers, *logging.getLogger().handlers]:
            if no_tips not in handler.filters:
                handler.addFilter(no_tips)
        logger.addFilter(no_tips)
    show = warnings.showwarning

    def show_and_log(message: Any, category: type[Warning], filename: str, lineno: int, *args: Any) -> None:
        show(message, category, filename, lineno, *args)
        RUN_LOG.warning("%s:%d: %s: %s", filename, lineno, category.__name__, message)

    if getattr(warnings.showwarning, "__name__", "") != "show_and_log":
        warnings.showwarning = show_and_log


def _overrides_and_groups() -> tuple[list[str], set[str]]:
    """The command line's config overrides and the config groups of this Hydra run (none outside Hydra)."""
    if not HydraConfig.initialized():
        return [], set()
    hc = HydraConfig.get()
    return list(hc.overrides.task), set(hc.runtime.choices.keys())


def _report_best(
    trainer: Any, history: Mapping[int, Mapping[str, Any]], final: Mapping[str, Any], final_step: int
) -> dict[str, Any] | None:
    """The best checkpoint (by the monitored metric) and its metrics, compared with the final weights' validation
    ``final``; printed, returned for metrics.json."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    best = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    if best is None or not best.best_model_path:
        return None
    from vss.checkpoint import checkpoint_step
    from vss.metrics import format_summary

    step = checkpoint_step(best.best_model_path)
    metrics = dict(history.get(step, {}))
    score = float(best.best_model_score) if best.best_model_score is not None else None
    key = best.monitor.split("/", 1)[-1]
    metrics.setdefault(key, score)
    line = format_summary(metrics) or (f"{best.monitor} {score:.4f}" if score is not None else "")
    say(
        f"[vss] best checkpoint: {best.best_model_path} (step {step}{': ' + line if line else ''}); "
        f"{compare_best(score, final.get(key), step, final_step, key, best.mode)}"
    )
    return {"step": step, "ckpt_path": best.best_model_path, "val": metrics}


def compare_best(best: float | None, final: float | None, step: int, final_step: int, key: str, mode: str) -> str:
    """How the best checkpoint's score stands against the final weights' (``last.ckpt``), by their printed values."""
    if step == final_step:
        return "the final weights"
    if best is None or final is None:
        return f"the final weights (step {final_step}) are in last.ckpt"
    shown = f"(step {final_step}, last.ckpt: {key} {final:.4f})"
    if f"{best:.4f}" == f"{final:.4f}":
        return f"ties with the final weights {shown}"
    better = best > final if mode == "max" else best < final
    return f"beats the final weights {shown}" if better else f"the final weights do better {shown}"


def terminated(output_dir: Path, step: int, command: str) -> SystemExit:
    """Say where the last checkpoint of a run stopped by SIGTERM is and how to resume; exit status 143."""
    from vss.checkpoint import checkpoint_step

    last = output_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        saved = checkpoint_step(last)
        where = f"last checkpoint: {last} (step {saved}); resume with: {command} ckpt_path={last}"
    else:
        where = "no checkpoint was written yet; start the run again"
    message = f"training stopped by SIGTERM at step {step}, before max_steps; {where}"
    RUN_LOG.error(message)
    print_error(message)
    return SystemExit(EXIT_SIGTERM)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate the config, build data/model/trainer, fit, and return the final validation metrics."""
    check_train_values(cfg)  # before torch is imported
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    check_pipeline_alone(cfg, hc.runtime.choices.get("experiment") if hc is not None else None)
    check_ddp_multirun(cfg, multirun=hc is not None and hc.mode == RunMode.MULTIRUN)

    import pytorch_lightning as pl
    from hydra.utils import instantiate
    from pytorch_lightning.utilities import rank_zero_only
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from vss.callbacks import (
        HoldDeviceBanner,
        RequeueOnSignal,
        RunReport,
        SaveOnSigterm,
        SaveOnValidationError,
        ValidateFinalStep,
        slurm_plugins,
    )
    from vss.checkpoint import AtomicCheckpointIO, remove_stale_temporary_files
    from vss.lit import build_module, use_eval_path
    from vss.locks import hold_run_directory, release_run_directory
    from vss.loggers import CSVLogger, continue_wandb_run, finish_wandb
    from vss.metrics import format_summary, write_metrics_json
    from vss.optim import describe_groups
    from vss.stages import check_resume_model, check_stages, init_weights, prepare_resume

    quiet_output()
    requeued = slurm_requeue_checkpoint(cfg)
    if requeued is not None:  # a requeued SLURM job: its own last.ckpt, with the config stored there (no overrides)
        cfg.ckpt_path, cfg.init_from, cfg.init_exclude = str(requeued), None, []
    init_state = check_stages(cfg)  # init_from / ckpt_path errors before anything is built
    resume = None
    if cfg.get("ckpt_path") is not None:
        resume = prepare_resume(cfg, *(((), ()) if requeued else _overrides_and_groups()))
        cfg = resume.config
        check_train_values(cfg)
    check_model_values(cfg)
    output_dir = Path(cfg.paths.output_dir)
    rank0 = rank_zero_only.rank == 0
    if rank0:
        took_over = hold_run_directory(output_dir)  # one process per run directory, before anything in it changes
        if took_over:
            say(f"[vss] note: {took_over}")
        (output_dir / "metrics.json").unlink(missing_ok=True)  # written again only when the run completes
        removed = remove_stale_temporary_files(output_dir / "checkpoints")
        if removed:
            names = ", ".join(p.name for p in removed[:3]) + (", ..." if len(removed) > 3 else "")
            say(f"[vss] removed {len(removed)} stale temporary file(s) of an interrupted write: {names}")
        stored = resume is not None and resume.stored  # the checkpoint's config: Hydra's choices are mere defaults
        say(describe_run(cfg, hc.runtime.choices if hc is not None and not stored else {}))
        if requeued is not None:
            say(f"[vss] SLURM job {slurm_job_id()} restarted (restart {slurm_restart_count()}): resuming its run")
        if resume is not None:
            say(resume.summary())
        try:
            RUN_LOG.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
        except Exception:  # an interpolation that only resolves later (e.g. outside Hydra): as composed
            RUN_LOG.info("config:\n%s", OmegaConf.to_yaml(cfg))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = instantiate(cfg.data)
    module = build_module(cfg, datamodule.num_classes, datamodule.class_names)
    if resume is not None:
        check_resume_model(module, resume)
    if init_state is not None:
        rank_zero_only(say)(init_weights(module.segmenter, cfg, init_state).summary())
        del init_state
    if rank0:
        total = sum(p.numel() for p in module.segmenter.parameters())
        trainable = sum(p.numel() for p in module.segmenter.parameters() if p.requires_grad)
        say(f"[vss] model: {total / 1e6:.2f} M parameters ({trainable / 1e6:.2f} M trainable)")
        say(describe_groups(module.param_groups()))
    use_eval_path(module, datamodule)
    if resume is not None:  # a run started before vss.loggers.CSVLogger: Lightning's would delete its metrics.csv
        for name, logger_cfg in (cfg.get("logger") or {}).items():
            if isinstance(logger_cfg, DictConfig) and logger_cfg.get("_target_") == LIGHTNING_CSV_LOGGER:
                cfg.logger[name]._target_ = "vss.loggers.CSVLogger"
    loggers = _instantiate_dict(cfg.get("logger"))
    for logger in loggers:  # Lightning always passes wandb.init(anonymous=None); wandb >= 0.19 warns it has no effect
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)
    if resume is not None:
        for logger in loggers:
            run_id = continue_wandb_run(logger, output_dir)
            if run_id is not None and rank0:
                say(f"[vss] W&B: continuing run {run_id}")
    if cfg.trainer.get("sync_batchnorm"):
        if _on_cpu(cfg):
            # torch's DistributedDataParallel rejects SyncBatchNorm on CPU modules (gloo): keep per-process BN there.
            log.warning("trainer.sync_batchnorm=true needs GPUs; running CPU DDP with per-process BatchNorm")
        else:  # here, not by Lightning: the frozen parts (freeze=...) keep plain, frozen BatchNorm
            from vss.stages import convert_sync_batchnorm

            convert_sync_batchnorm(module.segmenter)
    report = RunReport()
    banner = HoldDeviceBanner()  # Lightning's device lines once the data is set up, never before a data error
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=[
            *_instantiate_dict(cfg.get("callbacks")),
            banner,
            report,
            ValidateFinalStep(),  # the final step validated in fit: the checkpoint callbacks save it (last, best)
            SaveOnSigterm(output_dir / "checkpoints"),
            SaveOnValidationError(output_dir / "checkpoints"),
            RequeueOnSignal(),  # after SaveOnSigterm: requeue once last.ckpt is written
        ],
        logger=loggers or False,
        plugins=[AtomicCheckpointIO(bool(cfg.get("trust_pickle"))), *slurm_plugins()],
        sync_batchnorm=False,
    )
    quiet_output()  # again: Lightning's loggers have their handlers now
    if resume is not None and rank0:
        for logger in loggers:  # metrics.csv goes on from the rows logged before the checkpoint
            if isinstance(logger, CSVLogger):
                report.history.update(logger.resume_at(resume.step))
        # the run directory is this run's own; training clips are drawn at random, so a mid-epoch restart is sound
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        except SIGTERMException:
            raise terminated(output_dir, trainer.global_step, "python -m vss.train") from None
        step = trainer.global_step or int(trainer.callback_metrics.get("vss/step", 0))  # ddp_spawn: from rank 0
        validated = trainer.callback_metrics.get("vss/val_step")
        if validated is None or int(validated) != step:  # e.g. validation disabled: no checkpoint saw these metrics
            trainer.validate(module, datamodule=datamodule, verbose=False)  # metrics of the final weights
        metrics = _stage_results(module, trainer, "val")
        result: dict[str, Any] = {"step": step, "val": metrics}
        if cfg.get("test"):
            trainer.test(module, datamodule=datamodule, ckpt_path="best", verbose=False)
            result["test"] = _stage_results(module, trainer, "test")
        if trainer.is_global_zero:
            say(f"[vss] step {step}: {format_summary(metrics)}")
            best = _report_best(trainer, report.history, metrics, step)
            if best is not None:
                result["best"] = best
            write_metrics_json(result, output_dir / "metrics.json")
            say(f"[vss] run directory: {output_dir}")
        return result
    finally:
        finish_wandb()
        release_run_directory()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@friendly_errors
def _hydra_main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``optimized_metric`` for sweepers."""
    if _ARGV:
        sys.argv[:] = _ARGV  # the user's command line: what Lightning's DDP launcher re-runs per rank
    result = train(cfg)
    key = str(cfg.get("optimized_metric", "val/mIoU")).split("/")[-1]
    value = result["val"].get(key)
    return None if value is None else float(value)


def main() -> float | None:
    """``python -m vss.train`` / ``vss-train``: check the command line (no torch yet), pick a resume's run
    directory, then run Hydra."""
    args = sys.argv[1:]
    tune_host_allocator()
    friendly_errors(check_command_line)("train", args)
    _ARGV[:] = sys.argv
    sys.argv[1:] = resume_arguments(args)
    return _hydra_main()


if __name__ == "__main__":
    main()
