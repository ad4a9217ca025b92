"""LightningDataModule serving temporal clips from a VSPW-layout root (VSPW itself or the synthetic set)."""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from vss.data.clips import ClipSampler
from vss.data.datasets import EvalClips, EvalFrames, TrainClips, VideoShardSampler, deal_videos
from vss.data.predictions import PredictionFormat
from vss.data.transforms import build_eval_transform, build_train_transform, check_photometric

if TYPE_CHECKING:
    from vss.data.check import CheckReport, Scan

from vss.data.vspw import DatasetError, LabelMap, Video, check_choice, check_headers, read_mask, read_split
from vss.errors import ConfigError

RUN_LOG = logging.getLogger("vss.report")
VAL_CHECKS = ("auto", "full", "headers", "off")
"""``data.check_val``: what is read of the validation files before training (auto: full up to a size bound)."""


def _check_palette(palette: Sequence[Sequence[int]] | None, num_classes: int) -> list[tuple[int, int, int]] | None:
    """``data.palette``: one RGB triple (0..255) per class, or None (overlays then use a generated palette)."""
    if palette is None:
        return None
    colours = [tuple(int(v) for v in c) for c in palette]
    if len(colours) != num_classes or any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colours):
        raise ValueError(f"data.palette must be {num_classes} RGB triples in 0..255 (one per class), got {palette}")
    return colours  # type: ignore[return-value]


def worker_init(worker_id: int) -> None:
    """DataLoader worker start: ignore SIGTERM (the main process saves and stops the run; SLURM and ``kill -- -PGID``
    signal every process, and a worker killed first would crash the run instead), then Lightning's worker seeding,
    then the training set's own stream (albumentations' RNG does not follow the global seeds)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("PL_SEED_WORKERS") == "1":  # seed_everything(workers=True): what Lightning would have added
        from lightning_fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, TrainClips):  # its own stream per (seed, rank, worker)
        info.dataset.seed_stream(worker=info.id, base_seed=info.seed - info.id)


def _kill_workers_at_exit() -> None:
    """At interpreter exit, SIGKILL this process's daemonic children (DataLoader workers) and reap them.

    Workers ignore SIGTERM (:func:`worker_init`), and SIGTERM is what multiprocessing's own exit handler sends its
    daemonic children before joining them: with a DataLoader iterator still alive at exit (a run stopped by
    SIGTERM, a crash whose traceback holds the loop), that join would wait forever. Registered after
    multiprocessing's handler, so it runs first (atexit is last-in, first-out)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=10)


@functools.cache
def kill_workers_at_exit() -> None:
    """Register :func:`_kill_workers_at_exit` once, in the process that starts DataLoader workers."""
    import multiprocessing.util  # noqa: F401  (its exit handler is registered on import: ours must come after)

    atexit.register(_kill_workers_at_exit)


class VSSDataModule(pl.LightningDataModule):
    """Clips of ``len(offsets)+1`` frames (references then target) from ``root/{train,val,test}.txt``."""

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Config-time checks of this data set's part of a composed config (``data.*``), before anything is
        read: by default ``data.root`` must be an existing directory."""
        from omegaconf import OmegaConf

        if OmegaConf.is_missing(cfg.data, "root"):
            raise ConfigError("data.root is required but not set (pass data.root=...)")
        root = OmegaConf.select(cfg, "data.root", default=None)
        if not Path(str(root)).is_dir():
            raise ConfigError(
                f"data.root={root!r} is invalid: the directory does not exist (expected the dataset's root folder)"
            )

    @classmethod
    def detects(cls, root: Path) -> bool:
        """Whether ``root`` holds this data set's own layout (``python -m vss.data.check`` picks the layout by
        it); the VSPW layout is the default and detects nothing."""
        return False

    def __init__(
        self,
        root: str,
        num_classes: int,
        clip: Mapping[str, Any] | None = None,
        label_map: Mapping[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        scale: Sequence[int] = (853, 480),
        crop_size: Sequence[int] = (480, 480),
        ratio_range: Sequence[float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: str = "per_frame",
        size_divisor: int = 32,
        train_repeat: int = 50,
        batch_size: int = 2,
        val_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        verify: bool = False,
        sparse_labels: bool = False,
        check_val: str = "auto",
        check_val_max_mb: float | None = 2000.0,
        iou_mean: str = "gt_present",
        seed: int | None = None,
        check_val_headers: bool | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.num_classes = int(num_classes)
        clip = dict(clip or {})
        unknown = sorted(set(clip) - {"offsets", "reverse_prob"})
        if unknown:
            raise ValueError(f"data.clip has unknown key(s) {unknown}: expected offsets, reverse_prob")
        self.clip_sampler = ClipSampler(tuple(clip.get("offsets", ())), float(clip.get("reverse_prob", 0.5)))
        # evaluation input: frames (the stream path, default) or, after use_clip_path(), the model's clips
        self.eval_clips: tuple[Callable[[int, int], Sequence[int]], int] | None = None
        lm = dict(label_map or {"reduce_zero_label": True})
        self.label_map = LabelMap(self.num_classes, **lm)
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(
                f"data.class_names has {len(class_names)} names but data.num_classes is {self.num_classes}"
            )
        self.class_names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        self.palette = _check_palette(palette, self.num_classes)
        self.splits = {"fit": train_split, "validate": val_split, "test": test_split}
        self.scale, self.crop_size = tuple(scale), tuple(crop_size)
        self.aug = dict(
            ratio_range=tuple(ratio_range),
            cat_max_ratio=cat_max_ratio,
            flip_prob=flip_prob,
            photometric=check_photometric(photometric),
        )
        self.size_divisor = int(size_divisor)
        self.train_repeat = int(train_repeat)
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()  # pinning without a GPU only warns
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.verify = bool(verify)
        self.sparse_labels = bool(sparse_labels)
        self.check_val = check_choice("data.check_val", check_val, VAL_CHECKS)
        if check_val_headers is False:  # a config stored before data.check_val (a resumed run): false was off
            self.check_val = "off"
        self.check_val_max_mb = None if check_val_max_mb is None else float(check_val_max_mb)
        from vss.metrics.iou import check_iou_mean

        try:
            self.iou_mean = check_iou_mean(iou_mean)  # the dataset's mIoU convention (VSPW: GT-present classes)
        except ValueError as e:
            raise ValueError(f"data.{e}") from e
        self.seed = seed  # the training streams' root: one per (seed, rank, worker), see TrainClips
        self._videos: dict[str, list[Video]] = {}

    # -- data ---------------------------------------------------------------------------------
    def read_videos(self, split: str) -> list[Video]:
        """The videos of ``split`` from disk (the layout's reader; here VSPW's), raising on the first problem."""
        return read_split(self.root, split, sparse=self.sparse_labels)

    def read_label(self, path: Path) -> np.ndarray:
        """A mask file's raw values (H,W) uint8, before the label map (here the stored 8-bit values)."""
        return read_mask(path)

    def prediction_formats(self) -> dict[str, PredictionFormat]:
        """The formats saved predictions may take here, by name; the first is ``prediction_format=auto``."""
        return {"train_ids": PredictionFormat()}

    def prediction_format(self, name: str) -> PredictionFormat:
        """The format ``prediction_format=name`` selects; a ValueError lists this dataset's formats."""
        formats = self.prediction_formats()
        if name == "auto":
            return next(iter(formats.values()))
        if name not in formats:
            raise ValueError(
                f"prediction_format={name!r} is invalid for {type(self).__name__}: expected one of {['auto', *formats]}"
            )
        return formats[name]

    def scan(self, root: Path, split: str, problems: list[str]) -> list[Video]:
        """The videos of ``split`` for a check, every structural problem collected (here: the VSPW layout)."""
        from vss.data.check import scan_vspw

        return scan_vspw(root, split, problems, self.sparse_labels)

    def check_report(self, splits: Sequence[str], progress: bool = False, scan: Scan | None = None) -> CheckReport:
        """Read every frame and mask of ``splits`` through this layout's scan (or ``scan``) and label reader."""
        from vss.data.check import run_check

        scan = scan or self.scan
        return run_check(self.root, splits, self.label_map, progress, scan=scan, read_label=self.read_label)

    def check(self, splits: Sequence[str]) -> list[str]:
        """Every problem of ``splits`` (each naming the file): every frame and mask read (``data.verify``)."""
        return self.check_report(splits).problems

    def videos(self, split: str) -> list[Video]:
        """Videos of a split, read (and checked) once."""
        if split not in self._videos:
            self._videos[split] = self.read_videos(split)
            if self.verify:
                problems = self.check([split])
                if problems:
                    found_by = f"data.verify=true (every file of split {split!r} read before training)"
                    raise DatasetError(_problems_error(problems, self.root, found_by))
        return self._videos[split]

    def check_validation(self) -> None:
        """Before training, check the files validation will read (``data.check_val``): every frame and mask decoded
        and its labels mapped (``auto``: up to ``data.check_val_max_mb`` per process, else headers only, said in a
        line), or the headers only. Under DDP each process checks the videos it will validate, and every process
        raises the same error, naming each broken file."""
        if self.check_val == "off" or self.verify:  # data.verify has read every file of the split already
            return
        split = self.splits["validate"]
        pieces = self.eval_pieces(split)
        world, rank = self._distributed()
        owners = deal_videos([len(p) for p in pieces], world)  # as the validation sampler deals them
        mine = [p for p, owner in zip(pieces, owners, strict=True) if owner == rank]
        files = {f for p in pieces for f in (*p.frames, *p.masks) if f is not None}
        mode = self.check_val
        if mode == "auto":
            mb = sum(f.stat().st_size for f in files if f.is_file()) / 1e6
            if self.check_val_max_mb is not None and mb / world > self.check_val_max_mb:
                mode = "headers"
                self._say(
                    f"[vss] validation split {split!r}: {len(files)} files, {mb:.1f} MB ({mb / world:.1f} MB per "
                    f"process) exceed data.check_val_max_mb={self.check_val_max_mb:g}: headers checked only; "
                    "data.check_val=full reads every pixel before training"
                )
            else:
                mode = "full"
        start = time.perf_counter()
        full = mode == "full"

        def check(video: Video) -> list[str]:
            return self.check_report([split], scan=lambda *_: [video]).problems if full else check_headers([video])

        threads = max(1, min(self.num_workers, os.cpu_count() or 1))  # decoding releases the GIL
        with ThreadPoolExecutor(threads) as pool:
            problems = _gather([p for found in pool.map(check, mine) for p in found], world)
        if problems:
            setting = self.check_val if self.check_val == mode else f"{self.check_val}, {mode}"
            found_by = f"the check of validation split {split!r} before training (data.check_val={setting})"
            raise DatasetError(_problems_error(problems, self.root, found_by))
        if full:
            self._say(
                f"[vss] validation split {split!r}: {len(files)} files read and checked in "
                f"{time.perf_counter() - start:.2f} s before training (data.check_val={self.check_val})"
            )

    def _say(self, message: str) -> None:
        """Print a line (and write it to the run's ``train.log``), on the first process only."""
        if self._distributed()[1] == 0:
            print(message, flush=True)
            RUN_LOG.info(message)

    def setup(self, stage: str | None = None) -> None:
        """Read the split files now, so a broken dataset fails before the first step."""
        if stage in (None, "fit"):
            self.videos(self.splits["fit"])
            self.videos(self.splits["validate"])
            self.check_validation()  # a bad validation file must not wait for step N
        if stage == "validate":
            self.videos(self.splits["validate"])
        if stage in ("test", "predict"):
            self.videos(self.splits["test"])

    def train_dataset(self, rank: int = 0) -> TrainClips:
        """Random training clips of process ``rank`` (its workers each draw their own stream)."""
        tf = build_train_transform(self.scale, self.crop_size, **self.aug)
        videos = self.videos(self.splits["fit"])
        return TrainClips(
            videos, self.clip_sampler, self.label_map, tf, self.train_repeat, self.read_label, self.seed, rank
        )

    def use_clip_path(self, references: Callable[[int, int], Sequence[int]] | None, num_frames: int = 1) -> None:
        """Evaluate on clips: ``references(t, length)`` (the model's policy), padded to ``num_frames``; None: frames."""
        self.eval_clips = None if references is None else (references, int(num_frames))

    def eval_dataset(self, split: str) -> EvalFrames:
        """Every frame of ``split`` once, in order (stream path), or as the target of its clip (clip path).

        Sparse labels: the stream runs the pieces of each video around its labelled frames (every frame a
        labelled target's references need, in order); the clip path has one item per labelled frame.
        """
        tf = build_eval_transform(self.scale, self.size_divisor)
        if self.eval_clips is None:
            return EvalFrames(self.eval_pieces(split), self.label_map, tf, self.read_label)
        return EvalClips(self.videos(split), self.label_map, tf, *self.eval_clips, read_label=self.read_label)

    def eval_pieces(self, split: str) -> list[Video]:
        """The videos the stream path runs: each video whole, or (sparse labels) the pieces around its labels."""
        before, after = self.clip_sampler.before, self.clip_sampler.after
        return [piece for v in self.videos(split) for piece in v.segments(before, after)]

    # -- loaders ------------------------------------------------------------------------------
    def _distributed(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _loader(self, dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        if self.num_workers > 0:
            kill_workers_at_exit()
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            worker_init_fn=worker_init if self.num_workers > 0 else None,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        world, rank = self._distributed()
        dataset = self.train_dataset(rank)
        if len(dataset) < self.batch_size * world:  # drop_last would leave an epoch of no steps
            raise DatasetError(
                f"{len(dataset)} training clips per epoch ({len(dataset.videos)} videos x data.train_repeat="
                f"{self.train_repeat}) are fewer than data.batch_size={self.batch_size} x {world} process(es): no "
                "full batch; raise data.train_repeat or lower data.batch_size"
            )
        if world > 1:
            sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, drop_last=True)
            return self._loader(dataset, self.batch_size, sampler=sampler, drop_last=True)
        return self._loader(dataset, self.batch_size, shuffle=True, drop_last=True)

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self.eval_dataset(split)
        world, rank = self._distributed()
        return self._loader(dataset, self.val_batch_size, sampler=VideoShardSampler(dataset, world, rank))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.splits["validate"])

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.splits["test"])


def _gather(problems: list[str], world: int) -> list[str]:
    """Every process's ``problems``, in rank order (DDP: all processes must call this); else ``problems``."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return problems
    parts: list[list[str] | None] = [None] * world
    dist.all_gather_object(parts, problems)
    return [p for part in parts for p in part or []]


def _problems_error(problems: Sequence[str], root: Path, found_by: str, shown: int = 20) -> str:
    """The error for broken files found before training: one line for one file, else a line per file (``shown``
    at most)."""
    if len(problems) == 1:
        return f"{problems[0]}; found by {found_by}"
    more = f"\n... and {len(problems) - shown} more (python -m vss.data.check {root} lists every one)"
    return (
        f"{len(problems)} problems in {root}, found by {found_by}:\n"
        + "\n".join(problems[:shown])
        + (more if len(problems) > shown else "")
    )


class SyntheticDataModule(VSSDataModule):
    """The embedded procedural video set: generated (once, cached) under ``root``, then read as VSPW."""

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """No root to check: the set is generated under ``data.root`` when it is not cached yet."""

    def __init__(self, root: str, synthetic: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        from vss.data.synthetic import OBJECT_PALETTE, SyntheticConfig

        self.synthetic = dict(synthetic or {})
        try:
            knobs = SyntheticConfig(**self.synthetic)
        except (TypeError, ValueError) as e:
            raise ValueError(f"data.synthetic: {e}") from e
        num_classes = kwargs.pop("num_classes", None)
        if num_classes is not None and int(num_classes) != knobs.num_classes:
            raise ValueError(
                f"data.num_classes={num_classes} but data.synthetic.object_classes={knobs.object_classes} "
                f"gives {knobs.num_classes} classes (background + objects); set both consistently"
            )
        kwargs["class_names"] = kwargs.get("class_names") or list(knobs.class_names)
        kwargs["sparse_labels"] = knobs.label_every > 1 or bool(kwargs.get("sparse_labels", False))
        if kwargs.get("palette") is None:  # background grey, then each object class's own colour
            kwargs["palette"] = [(128, 128, 128), *list(OBJECT_PALETTE.values())[: knobs.object_classes]]
        super().__init__(root=root, num_classes=knobs.num_classes, **kwargs)

    def prepare_data(self) -> None:
        """Generate the dataset if it is not cached yet (rank 0 only under DDP)."""
        from vss.data.synthetic import ensure_synthetic

        ensure_synthetic(self.root, **self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # a no-op when cached; makes setup() alone usable (tests, eval)
        super().setup(stage)
