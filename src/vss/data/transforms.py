"""Clip augmentation with albumentations 2.x: one set of random parameters for every frame and mask of a clip.

The clip goes through ``Compose(images=..., masks=...)`` (albumentations' plural targets), so the
rescale, crop, flip and photometric distortion drawn once apply to all T frames and masks alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from vss.data.vspw import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def keep_ratio_size(height: int, width: int, scale: Sequence[int], ratio: float = 1.0) -> tuple[int, int]:
    """Size (h, w) of mmseg's keep-ratio rescale: fit the long/short sides into ``int(scale * ratio)``."""
    long_edge, short_edge = int(max(scale) * ratio), int(min(scale) * ratio)  # mmseg truncates the scaled scale
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


class KeepRatioRescale(A.DualTransform):
    """Rescale so the frame fits ``scale`` (long, short) times a ratio drawn from ``ratio_range`` (mmseg Resize)."""

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] = (1.0, 1.0), p: float = 1.0) -> None:
        super().__init__(p=p)
        self.scale = tuple(int(s) for s in scale)
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Draw one ratio for the whole clip."""
        h, w = params["shape"][:2]
        ratio = self.py_random.uniform(*self.ratio_range)
        return {"size": keep_ratio_size(h, w, self.scale, ratio)}

    def apply(self, img: np.ndarray, size: tuple[int, int] = (1, 1), **params: Any) -> np.ndarray:
        """Bilinear resize of a frame."""
        return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int] = (1, 1), **params: Any) -> np.ndarray:
        """Nearest resize of a mask."""
        return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale", "ratio_range")


class AlignedResize(A.ImageOnlyTransform):
    """Resize a frame so both sides are multiples of ``size_divisor`` (ceil), as MRCFA's AlignedResize."""

    def __init__(self, size_divisor: int = 32, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.size_divisor = int(size_divisor)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        """Bilinear resize up to the next multiple of the divisor."""
        d = self.size_divisor
        h, w = img.shape[:2]
        nh, nw = math.ceil(h / d) * d, math.ceil(w / d) * d
        if (nh, nw) == (h, w):
            return img
        return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size_divisor",)


class CatMaxRatioCrop(A.DualTransform):
    """Random crop, retried up to 10 times until no class covers more than ``cat_max_ratio`` (mmseg RandomCrop).

    The window is checked against the target frame's mask (the last mask of the clip), as in MRCFA.
    Frames smaller than the crop are cropped to their own size; pad afterwards.
    """

    def __init__(self, height: int, width: int, cat_max_ratio: float = 0.75, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.height, self.width, self.cat_max_ratio = int(height), int(width), float(cat_max_ratio)

    def _window(self, h: int, w: int) -> tuple[int, int, int, int]:
        y0 = self.py_random.randint(0, max(h - self.height, 0))
        x0 = self.py_random.randint(0, max(w - self.width, 0))
        return y0, x0, min(y0 + self.height, h), min(x0 + self.width, w)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Draw one crop window for the whole clip."""
        h, w = params["shape"][:2]
        window = self._window(h, w)
        masks = data.get("masks")
        if self.cat_max_ratio < 1.0 and masks is not None and len(masks):
            target = masks[-1]
            for _ in range(10):
                y0, x0, y1, x1 = window
                labels, counts = np.unique(target[y0:y1, x0:x1], return_counts=True)
                counts = counts[labels != IGNORE_INDEX]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                window = self._window(h, w)
        return {"window": window}

    def apply(self, img: np.ndarray, window: tuple[int, int, int, int] = (0, 0, 1, 1), **params: Any) -> np.ndarray:
        """Crop a frame or mask."""
        y0, x0, y1, x1 = window
        return np.ascontiguousarray(img[y0:y1, x0:x1])

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "cat_max_ratio")


def build_train_transform(
    scale: Sequence[int],
    crop_size: Sequence[int],
    ratio_range: Sequence[float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: bool = True,
    seed: int | None = None,
) -> A.Compose:
    """Training pipeline: rescale x[0.5, 2], crop (cat_max_ratio), flip, photometric distortion, normalise, pad."""
    ch, cw = int(crop_size[0]), int(crop_size[1])
    steps: list[A.BasicTransform] = [
        KeepRatioRescale(scale, ratio_range),
        CatMaxRatioCrop(ch, cw, cat_max_ratio),
        A.HorizontalFlip(p=flip_prob),
    ]
    if photometric:
        # mmseg PhotoMetricDistortion: brightness +-32, contrast x[0.5,1.5], saturation x[0.5,1.5], hue +-18/180.
        steps += [
            A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0.5, p=0.5),
            A.ColorJitter(brightness=0.0, contrast=0.0, saturation=(0.5, 1.5), hue=0.05, p=0.5),
        ]
    steps += [
        A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        A.PadIfNeeded(ch, cw, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=IGNORE_INDEX),
        ToTensorV2(),
    ]
    return A.Compose(steps, strict=True, seed=seed)


def build_eval_transform(scale: Sequence[int], size_divisor: int = 32) -> A.Compose:
    """Evaluation pipeline for frames only: keep-ratio resize to the base size, sides divisible by 32."""
    return A.Compose(
        [
            KeepRatioRescale(scale),
            AlignedResize(size_divisor),
            A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
            ToTensorV2(),
        ],
        strict=True,
    )
