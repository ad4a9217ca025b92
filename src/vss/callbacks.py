"""Lightning callbacks of the suite: validation overlays (PNGs, TensorBoard, W&B masks) with the data's class
colours and a legend, the step progress bar, the run report (per-validation lines, ``ddp_spawn`` results),
the validation of the final step and the checkpoint written when SIGTERM stops a run."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException

from vss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from vss.errors import IGNORE_INDEX
from vss.metrics import SUMMARY_KEYS

RUN_LOG = logging.getLogger("vss.report")
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # torch's pytree deprecation, from inside Lightning
    r"It is recommended to use `self\.log\('(val|test)/",  # the metrics are synced by torchmetrics before logging
)


def quiet_warnings() -> None:
    """Ignore the known-harmless warnings (:data:`QUIET_WARNINGS`) in this process (a spawned rank too)."""
    import warnings

    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if "SLURM_JOB_ID" not in os.environ:  # a login node or a machine with SLURM installed: running here is intended
        warnings.filterwarnings("ignore", message=SRUN_NOT_USED)


SRUN_NOT_USED = r"The `srun` command is available on your system but is not used"
"""Lightning's hint wherever ``srun`` is on the PATH; kept inside a SLURM job (there it may mean a missing srun)."""


def palette(num_classes: int) -> np.ndarray:
    """Distinct RGB colours per class (PASCAL-style bit pattern); ignore is black."""
    pal = np.zeros((256, 3), np.uint8)
    for c in range(num_classes):
        lab, r, g, b = c + 1, 0, 0, 0
        for shift in range(8):
            r |= ((lab >> 0) & 1) << (7 - shift)
            g |= ((lab >> 1) & 1) << (7 - shift)
            b |= ((lab >> 2) & 1) << (7 - shift)
            lab >>= 3
        pal[c] = (r, g, b)
    return pal


def class_palette(num_classes: int, colours: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """A 256x3 lookup table: the data's class colours (``data.palette``) where given, else :func:`palette`;
    ignore (255) and unused values black."""
    pal = palette(num_classes)
    if colours is not None:
        pal[: len(colours)] = np.asarray(colours, np.uint8).reshape(-1, 3)
    pal[num_classes:] = 0
    return pal


def draw_legend(
    width: int, names: Sequence[str], colours: np.ndarray, classes: Sequence[int], ignore: bool = True
) -> np.ndarray:
    """Rows of colour swatch + class name for ``classes`` (and ignore, unless ``ignore=False``), ``width`` pixels
    wide (RGB uint8)."""
    import cv2

    entries = [(names[c], tuple(int(v) for v in colours[c])) for c in classes]
    if ignore:
        entries.append(("ignore", (0, 0, 0)))
    font, scale, thick, line = cv2.FONT_HERSHEY_SIMPLEX, 0.35, 1, 12
    widths = [12 + cv2.getTextSize(n, font, scale, thick)[0][0] + 8 for n, _ in entries]
    rows, x = [[]], 0
    for entry, w in zip(entries, widths, strict=True):
        if x + w > width and rows[-1]:
            rows.append([])
            x = 0
        rows[-1].append((entry, x))
        x += w
    legend = np.full((line * len(rows) + 2, width, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        y = r * line + 1
        for (name, colour), x0 in row:
            cv2.rectangle(legend, (x0 + 1, y + 1), (x0 + 9, y + 9), colour, -1)
            cv2.rectangle(legend, (x0 + 1, y + 1), (x0 + 9, y + 9), (90, 90, 90), 1)
            cv2.putText(legend, name, (x0 + 12, y + 9), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    return legend


def overlay_panel(
    image: np.ndarray, pred: np.ndarray, gt: np.ndarray, pal: np.ndarray, names: Sequence[str]
) -> np.ndarray:
    """frame | prediction | ground truth (class colours blended at 50%), with a legend of the classes shown."""
    tiles = [image] + [(0.5 * image + 0.5 * pal[m]).astype(np.uint8) for m in (pred, gt)]
    panel = np.concatenate(tiles, 1)
    shown = sorted({int(v) for v in np.unique(np.concatenate([pred.ravel(), gt.ravel()])) if v < len(names)})
    return np.concatenate([panel, draw_legend(panel.shape[1], names, pal, shown)], 0)


def pick_overlay_frames(videos: Sequence[Any], count: int, root: Path | None = None) -> list[tuple[str, int]]:
    """``count`` (video, frame) pairs spread over the videos, labelled frames only (sparse labels: a frame without
    a mask has an all-ignore truth); in each, a frame where the synthetic set hid an object's colour
    (``hidden.json``) when there is one, else frames spread over the video's labelled frames."""
    if not videos or count <= 0:
        return []
    picks: list[tuple[str, int]] = []
    order = [videos[i] for i in np.linspace(0, len(videos) - 1, min(count, len(videos))).round().astype(int)]
    rounds = math.ceil(count / len(order))
    for video in order:
        labelled = list(video.labelled)
        hidden: list[int] = []
        info = None if root is None else Path(root) / "data" / video.name / "hidden.json"
        if info is not None and info.is_file():
            data = json.loads(info.read_text())
            hidden = sorted(
                {t for o in data.get("objects", []) for t in o.get("hidden", [])} | set(data.get("storm", []))
            )
            hidden = [t for t in hidden if t in set(labelled)]
        n = len(labelled)
        spread = [labelled[int(round((j + 1) * (n - 1) / (rounds + 1)))] for j in range(rounds)] if n else []
        chosen = [hidden[int(j * len(hidden) / rounds)] for j in range(min(rounds, len(hidden)))] if hidden else []
        chosen += [t for t in dict.fromkeys(spread) if t not in chosen][: rounds - len(chosen)]
        picks += [(video.name, t) for t in chosen]
    return picks[:count]


def _logger(trainer: pl.Trainer, kind: str) -> Any:
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    cls = {"wandb": WandbLogger, "tensorboard": TensorBoardLogger}[kind]
    return next((lg for lg in trainer.loggers if isinstance(lg, cls)), None)


class ValidationImages(pl.Callback):
    """After each validation: frame | prediction | truth panels of ``num_images`` targets spread over the
    validation videos (frames whose colour cue the synthetic set hid, where known), in the data's class colours
    with a legend, under ``dirpath/stepNNNNNNN/``; also to TensorBoard, and to W&B as mask overlays with the
    per-class IoU table (rank 0 only)."""

    def __init__(self, num_images: int = 4, dirpath: str | None = None) -> None:
        super().__init__()
        self.num_images = int(num_images)
        self.dirpath = Path(dirpath) if dirpath else None
        self._kept: list[dict[str, Any]] = []
        self._wanted: set[tuple[str, int]] = set()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._kept = []
        dm = getattr(trainer, "datamodule", None)
        if not self._wanted and dm is not None and hasattr(dm, "videos"):
            videos = dm.videos(dm.splits["validate"])
            self._wanted = set(pick_overlay_frames(videos, self.num_images, getattr(dm, "root", None)))

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not isinstance(outputs, dict):
            return
        for item, pred in zip(outputs.get("items", []), outputs.get("preds", []), strict=True):
            # a piece of a sparsely labelled video (Video.segments) numbers its frames from its start
            key = (item.get("source_video", item["video"]), int(item.get("source_frame", item["frame"])))
            unlabelled = not item.get("labelled", True)  # its truth is all ignore
            if unlabelled or self._wanted and key not in self._wanted or len(self._kept) >= self.num_images:
                continue
            img = item["images"][-1] if item["images"].ndim == 4 else item["images"]
            if img.is_floating_point():  # a normalised frame (the loaders give uint8 ones)
                mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
                img = ((img.float().cpu() * std + mean).clamp(0, 1) * 255).byte()
            img = img.cpu().permute(1, 2, 0).numpy()
            self._kept.append(
                {
                    "name": f"{key[0]}_{key[1]:05d}",
                    "image": img,
                    "pred": pred.cpu().numpy().astype(np.uint8),
                    "gt": item["labels"].cpu().numpy().astype(np.uint8),
                }
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        kept, self._kept = sorted(self._kept, key=lambda o: o["name"]), []
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        wb = _logger(trainer, "wandb")
        per_class = (getattr(pl_module, "last_metrics", {}) or {}).get("per_class_iou")
        if wb is not None and per_class:
            rows = [[n, v] for n, v in per_class.items()]
            wb.log_table(key="val/per_class_iou", columns=["class", "IoU"], data=rows, step=trainer.global_step)
        if not kept:
            return
        import cv2

        dm = getattr(trainer, "datamodule", None)
        pal = class_palette(pl_module.num_classes, getattr(dm, "palette", None))
        names = list(pl_module.class_names)
        for o in kept:  # the frame was resized for the network; bring it back to the mask size
            o["image"] = cv2.resize(o["image"], o["gt"].shape[::-1], interpolation=cv2.INTER_LINEAR)
            o["panel"] = overlay_panel(o["image"], o["pred"], o["gt"], pal, names)
        if self.dirpath is not None:
            out = self.dirpath / f"step{trainer.global_step:07d}"
            out.mkdir(parents=True, exist_ok=True)
            for o in kept:
                cv2.imwrite(str(out / f"{o['name']}.png"), cv2.cvtColor(o["panel"], cv2.COLOR_RGB2BGR))
        tb = _logger(trainer, "tensorboard")
        if tb is not None:
            for o in kept:
                tb.experiment.add_image(f"val/overlays/{o['name']}", o["panel"], trainer.global_step, dataformats="HWC")
        if wb is not None:
            labels = dict(enumerate(names)) | {IGNORE_INDEX: "ignore"}
            masks = [
                {
                    "predictions": {"mask_data": o["pred"], "class_labels": labels},
                    "ground_truth": {"mask_data": o["gt"], "class_labels": labels},
                }
                for o in kept
            ]
            wb.log_image(
                "val/overlays",
                images=[o["image"] for o in kept],
                masks=masks,
                caption=[o["name"] for o in kept],
                step=trainer.global_step,
            )


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole job: ``step n/max_steps``, the ETA of the remaining steps, the training loss and
    the latest validation mIoU (not Lightning's per-epoch bar)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = bar.n = trainer.global_step
        bar.set_description("step")
        bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar across epochs

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        n = trainer.global_step
        if bar is not None and (n % max(self.refresh_rate, 1) == 0 or n >= trainer.max_steps):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        pass

    def get_metrics(self, trainer: pl.Trainer, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return {k.replace("train/", "").replace("val/", "val "): v for k, v in metrics.items()}


class RunReport(pl.Callback):
    """Per validation: a ``[vss] validation at step N`` line in ``train.log`` and the metrics by step (for the
    final summary). ``ddp_spawn`` runs fit/validate/test in worker processes and hands back only rank 0's
    ``trainer.callback_metrics``: keep the final step, the last validated step and the per-class IoU there too, as
    tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[int, dict[str, Any]] = {}

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        quiet_warnings()  # ddp_spawn ranks start a fresh interpreter without the main process's filters

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        trainer.callback_metrics["vss/step"] = torch.tensor(trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        trainer.callback_metrics["vss/val_step"] = torch.tensor(trainer.global_step)
        self._per_class(trainer, pl_module, "val")
        metrics = {k: v for k, v in (pl_module.last_metrics or {}).items() if k != "per_class_iou"}
        if metrics and trainer.is_global_zero:
            self.history[trainer.global_step] = metrics
            line = " | ".join(f"{k} {metrics[k]:.4f}" for k in SUMMARY_KEYS if metrics.get(k) is not None)
            RUN_LOG.info("[vss] validation at step %d: %s", trainer.global_step, line)

    def on_test_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._per_class(trainer, pl_module, "test")

    @staticmethod
    def _per_class(trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        if trainer.sanity_checking:
            return
        values = (pl_module.last_metrics.get("per_class_iou") or {}).values()
        iou = [math.nan if v is None else float(v) for v in values]
        trainer.callback_metrics[f"vss/{stage}_per_class_iou"] = torch.tensor(iou, dtype=torch.float64)


def scheduled_validation(trainer: pl.Trainer) -> bool:
    """Whether Lightning validates after this training batch by itself (every ``val_check_interval`` batches)."""
    return (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % trainer.val_check_batch == 0


class ValidateFinalStep(pl.Callback):
    """Validate the weights of the last training step inside ``fit`` also when ``max_steps`` is not a multiple of
    ``val_check_interval``: the checkpoint callbacks see that validation, so the best checkpoint is chosen among
    every validation, the final one included (and :class:`LastCheckpoint` saves the final step)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if 0 < trainer.max_steps <= trainer.global_step and not scheduled_validation(trainer):
            trainer.should_stop = True  # Lightning runs the validation loop after a batch that stops training


class LastCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` of one ``monitor=None`` file (``last.ckpt``) after every validation, and at
    the end of training when that step is not saved yet (no validation ran): the final weights, always. After an
    unscheduled validation (:class:`ValidateFinalStep`, early stopping) the write waits for the end of training:
    Lightning restores such a mid-batch state with its logging step one behind."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not trainer.should_stop or scheduled_validation(trainer):
            super().on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):  # not yet saved at this step
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


class SaveOnSigterm(pl.Callback):
    """When SIGTERM stops training (preemption, ``timeout``), write ``dirpath/last.ckpt`` at the current step, so a
    resume loses nothing; not mid-validation (the last validation's ``last.ckpt`` stays)."""

    def __init__(self, dirpath: str | Path) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or not trainer.training or trainer.sanity_checking:
            return
        trainer.save_checkpoint(self.dirpath / "last.ckpt")


class SaveOnValidationError(pl.Callback):
    """When a validation inside training fails (e.g. a broken validation file the check before training did not
    read: ``data.check_val``), write ``dirpath/last.ckpt`` at the current step first, so the training is kept. The
    failing process writes it itself (DDP weights are the same on every rank), without the barrier of
    ``trainer.save_checkpoint`` that the other processes, still validating, would never reach."""

    def __init__(self, dirpath: str | Path) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, Exception) or trainer.state.fn != "fit" or not trainer.validating:
            return  # SIGTERM, Ctrl+C (BaseException) and errors outside validation are not this callback's
        if trainer.sanity_checking or trainer.global_step == 0:
            return  # nothing trained yet
        path = self.dirpath / "last.ckpt"
        trainer.strategy.checkpoint_io.save_checkpoint(trainer._checkpoint_connector.dump_checkpoint(), path)
        message = (
            f"[vss] the validation at step {trainer.global_step} failed; the weights of step {trainer.global_step} "
            f"are saved first: {path} (resume with ckpt_path={path} once the error is fixed)"
        )
        print(message, flush=True)
        RUN_LOG.error(message)


def slurm_plugins() -> list[Any]:
    """Inside a SLURM job: Lightning's ``SLURMEnvironment`` without its auto-requeue (vss's requeue is
    :class:`RequeueOnSignal`, one mechanism: no ``hpc_ckpt_*.ckpt``, no second ``scontrol requeue``); else none."""
    from lightning_fabric.plugins.environments import SLURMEnvironment

    from vss.cluster import slurm_job

    return [SLURMEnvironment(auto_requeue=False)] if slurm_job() else []


class RequeueOnSignal(pl.Callback):
    """Inside a SLURM job, the requeue signal (SIGUSR1: ``--signal=USR1@90`` before the time limit, or
    ``scancel --signal=USR1``) stops training as SIGTERM does (:class:`SaveOnSigterm` writes ``last.ckpt``), then
    global rank 0 runs ``scontrol requeue``; the restarted job resumes from that checkpoint (``vss.train``).
    Outside training (setup, the final validation) the signal is ignored; outside SLURM nothing is installed."""

    def __init__(self) -> None:
        super().__init__()
        self.requested = False
        self._training = False

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        from vss.cluster import SLURM_REQUEUE_SIGNAL, slurm_job

        if stage == "fit" and slurm_job():
            signal.signal(getattr(signal, f"SIG{SLURM_REQUEUE_SIGNAL}"), self._on_signal)

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._training = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._training = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self._training or self.requested:
            RUN_LOG.warning("[vss] requeue signal %d outside training: ignored", signum)
            return
        self.requested = True
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's SIGTERM path: every rank stops after this step

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._training = False
        if not self.requested or not isinstance(exception, SIGTERMException) or not trainer.is_global_zero:
            return
        from vss.cluster import slurm_requeue

        job = slurm_requeue()
        message = f"[vss] requeued SLURM job {job} at step {trainer.global_step}; it resumes from its last.ckpt"
        print(message, flush=True)
        RUN_LOG.info(message)


class HoldDeviceBanner(pl.Callback, logging.Filter):
    """Lightning's device lines (``GPU available: False, used: False``, ``TPU available ...``), logged when the
    Trainer is built, held back until the data is set up: a data error is one line with nothing before it.

    Create it before the Trainer; it replays the lines in ``setup`` (after the data module's) and lets go.
    """

    LOGGER = "pytorch_lightning.utilities.rank_zero"
    PREFIXES = ("GPU available", "TPU available", "HPU available", "IPU available")

    def __init__(self) -> None:
        pl.Callback.__init__(self)
        logging.Filter.__init__(self)
        self.held: list[logging.LogRecord] = []
        logging.getLogger(self.LOGGER).addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(self.PREFIXES):
            self.held.append(record)
            return False
        return True

    def release(self) -> None:
        """Stop holding lines back and log those held."""
        logger = logging.getLogger(self.LOGGER)
        logger.removeFilter(self)
        for record in self.held:
            logger.handle(record)
        self.held = []

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        self.release()

    def teardown(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        logging.getLogger(self.LOGGER).removeFilter(self)  # a run that failed before setup: the lines are dropped
