"""Clip datasets over the VSPW layout: random clips for training, every frame once for evaluation."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vss.data.clips import ClipSampler
from vss.data.transforms import TrainTransform, seed_transform
from vss.data.vspw import IGNORE_INDEX, DatasetError, LabelMap, Video, read_image, read_mask

LabelReader = Callable[[Path], np.ndarray]


def _load_clip(
    video: Video, indices: Sequence[int], label_map: LabelMap, read_label: LabelReader = read_mask
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames (T,H,W,3), training-id masks (T,H,W) and raw masks (T,H,W) of a clip, sizes checked.

    An unlabelled frame (sparse labels) gets an all-ignore mask (raw and training ids 255).
    """
    frames, raws = [], []
    for i in indices:
        img = read_image(video.frames[i])
        mask = video.masks[i]
        if mask is None:
            raw = np.full(img.shape[:2], IGNORE_INDEX, np.uint8)
        else:
            raw = read_label(mask)
            if img.shape[:2] != raw.shape:
                raise DatasetError(
                    f"mask {mask} is {raw.shape[1]}x{raw.shape[0]} but its frame {video.frames[i]} is "
                    f"{img.shape[1]}x{img.shape[0]} (width x height); they must match"
                )
        if frames and img.shape != frames[0].shape:
            raise DatasetError(
                f"video {video.name!r}: frame {video.frames[i]} is {img.shape[1]}x{img.shape[0]} but "
                f"{video.frames[indices[0]]} is {frames[0].shape[1]}x{frames[0].shape[0]}; "
                "a video's frames must share one size"
            )
        frames.append(img)
        raws.append(raw)
    labels = [
        raw if video.masks[i] is None else label_map(raw, video.masks[i]) for raw, i in zip(raws, indices, strict=True)
    ]
    return np.stack(frames), np.stack(labels), np.stack(raws)


def stream_seed(seed: int | None, rank: int, worker: int, base_seed: int = 0) -> int | None:
    """The random stream of one data worker of one process: a function of (seed, rank, worker, base seed).

    ``base_seed`` is the DataLoader's seed for this epoch's workers (drawn from the seeded torch RNG of the
    main process), so workers restarted each epoch (``persistent_workers=false``) do not replay the last
    epoch's draws. None (no ``data.seed``): fresh entropy.
    """
    if seed is None:
        return None
    return int(np.random.SeedSequence([int(seed), int(rank), int(worker), int(base_seed)]).generate_state(1)[0])


class TrainClips(Dataset):
    """Random training clips: item i draws a clip from video ``i % num_videos`` (``repeat`` passes per epoch).

    The clip draw (target, direction) and the augmentation share one random stream per (seed, rank, worker):
    :meth:`seed_stream` sets it, in the main process at construction and in each DataLoader worker at start.
    An item is ``images`` (T,3,H,W) uint8, ``labels`` (T,H,W) uint8 (255 ignore; ``LabelMap`` holds num_classes to
    1..255, so the ids always fit) and ``valid``: the (h, w) before padding to the crop (:class:`TrainTransform`).
    """

    def __init__(
        self,
        videos: list[Video],
        sampler: ClipSampler,
        label_map: LabelMap,
        transform: TrainTransform,
        repeat: int = 1,
        read_label: LabelReader = read_mask,
        seed: int | None = None,
        rank: int = 0,
    ) -> None:
        self.videos, self.sampler, self.label_map, self.transform = videos, sampler, label_map, transform
        self.repeat, self.read_label = int(repeat), read_label
        self.targets = [None if v.dense else v.labelled for v in videos]  # sparse labels: targets are labelled
        self.seed, self.rank = seed, int(rank)
        self.seed_stream(worker=0)

    def seed_stream(self, worker: int, base_seed: int = 0) -> None:
        """Seed the clip draw and the augmentation for ``worker`` of this rank (:func:`stream_seed`)."""
        s = stream_seed(self.seed, self.rank, worker, base_seed)
        self.rng = random.Random(s)
        seed_transform(self.transform, s)

    def __len__(self) -> int:
        return len(self.videos) * self.repeat

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        v = i % len(self.videos)
        video = self.videos[v]
        indices = self.sampler.train_indices(len(video), self.rng, self.targets[v])
        try:
            frames, labels, _ = _load_clip(video, indices, self.label_map, self.read_label)
        except DatasetError as e:
            raise DatasetError(f"{e} (python -m vss.data.check lists every broken file of a dataset)") from e
        out = self.transform(images=frames, masks=labels)  # uint8 frames, labels and the size before padding
        return {"images": out["images"], "labels": out["masks"], "valid": out["valid"]}


class EvalFrames(Dataset):
    """Every frame of every video once, in video order then frame order (the stream path's input).

    Frames are resized by ``transform``; labels stay at the stored resolution so metrics are computed
    on the original masks, as the official VSPW evaluation does. With sparse labels the videos are the
    pieces around the labelled frames (:meth:`Video.segments`); ``labelled`` says which items are scored.
    """

    clips = False  # items hold (3,H,W) frames; EvalClips: (T,3,H,W) clips

    def __init__(
        self, videos: list[Video], label_map: LabelMap, transform: A.Compose, read_label: LabelReader = read_mask
    ) -> None:
        self.videos, self.label_map, self.transform, self.read_label = videos, label_map, transform, read_label
        self.items = [(v, t) for v, video in enumerate(videos) for t in self.targets(video)]

    def targets(self, video: Video) -> Sequence[int]:
        """The frames of ``video`` that are items: all of them (a stream runs every frame)."""
        return range(len(video))

    def __len__(self) -> int:
        return len(self.items)

    def frame_indices(self, video: Video, t: int) -> list[int]:
        """The frames item ``t`` loads: the target alone."""
        return [t]

    def __getitem__(self, i: int) -> dict[str, Any]:
        v, t = self.items[i]
        video = self.videos[v]
        indices = self.frame_indices(video, t)
        frames, labels, raws = _load_clip(video, indices, self.label_map, self.read_label)
        images = self.transform(images=frames)["images"]  # uint8, normalised on the model's device
        return {
            "images": images if self.clips else images[0],
            "labels": torch.from_numpy(labels[-1]),  # uint8 training ids, 255 ignore
            "raw_target": torch.from_numpy(raws[-1]),
            "video": video.name,
            "frame": t,
            "frame_name": video.label_name(t),
            "video_length": len(video),
            "labelled": video.masks[t] is not None,
            "source_video": video.source or video.name,  # a piece of a sparse video: the whole video's name
            "source_frame": video.start + t,
        }


class EvalClips(EvalFrames):
    """The clip path: every frame is a target once, with the references the model's policy picks for it.

    ``references(t, length)`` is the model's start-of-video policy (``Segmenter.references``). Clips are
    padded at the front with the target to ``num_frames`` frames so they batch; ``num_references`` says how
    many frames before the target are real references (``images[:, -1 - n:-1]``).
    """

    clips = True

    def __init__(
        self,
        videos: list[Video],
        label_map: LabelMap,
        transform: A.Compose,
        references: Callable[[int, int], Sequence[int]],
        num_frames: int,
        read_label: LabelReader = read_mask,
    ) -> None:
        self.references, self.num_frames = references, int(num_frames)
        super().__init__(videos, label_map, transform, read_label)

    def targets(self, video: Video) -> Sequence[int]:
        """Every labelled frame."""
        return video.labelled

    def frame_indices(self, video: Video, t: int) -> list[int]:
        refs = list(self.references(t, len(video)))
        if len(refs) >= self.num_frames:
            raise ValueError(
                f"the model's policy gives {len(refs)} references for frame {t}; at most {self.num_frames - 1}"
            )
        return [t] * (self.num_frames - 1 - len(refs)) + refs + [t]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = super().__getitem__(i)
        v, t = self.items[i]
        item["num_references"] = len(self.references(t, len(self.videos[v])))
        return item


def deal_videos(lengths: Sequence[int], num_replicas: int) -> list[int]:
    """The rank of each video (``lengths``: its frames): longest first to the least-loaded rank."""
    load, owner = [0] * num_replicas, [0] * len(lengths)
    for v in sorted(range(len(lengths)), key=lambda v: (-lengths[v], v)):
        owner[v] = min(range(num_replicas), key=lambda r: (load[r], r))
        load[owner[v]] += lengths[v]
    return owner


class VideoShardSampler(Sampler[int]):
    """Splits evaluation items by whole videos over DDP ranks, without padding or duplicates.

    Whole videos are dealt out longest first to the least-loaded rank, so the ranks' frame counts
    differ by at most the longest video; each rank reads its videos in dataset order. Every frame is
    seen by exactly one rank, so summed metric states equal a single-process run.
    """

    def __init__(self, dataset: EvalFrames, num_replicas: int, rank: int) -> None:
        lengths = [len(v) for v in dataset.videos]
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
        owner = deal_videos(lengths, num_replicas)
        self.indices = [i for v, o in enumerate(owner) if o == rank for i in range(starts[v], starts[v + 1])]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
