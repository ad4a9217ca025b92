"""Clip augmentation with albumentations 2.x: one set of geometric parameters for every frame and mask of a clip.

The clip goes through ``Compose(images=..., masks=...)`` (albumentations' plural targets), so the
rescale, crop and flip drawn once apply to all T frames and masks alike. mmseg's photometric distortion
is drawn per frame (MRCFA's ``PhotoMetricDistortion_clips``) or once per clip (``data.photometric``).

Frames leave the pipelines as uint8 (T,3,H,W) tensors and labels as uint8 (255 = ignore): the ImageNet
normalisation happens on the model's device (:meth:`vss.models.segmenter.Segmenter.normalize`), a quarter of the
bytes crossing from the DataLoader workers. Training clips smaller than the crop are padded at the bottom/right
and carry their size before padding (``valid``), so the padding is zeroed after normalising, as mmseg pads after
``Normalize``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from vss.data.vspw import IGNORE_INDEX
from vss.models.ops.normalize import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD"]  # the constants live with the on-device normalisation


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


Photometric = Literal["per_frame", "per_clip", "none"]
PHOTOMETRIC_MODES: tuple[str, ...] = ("per_frame", "per_clip", "none")


def _affine_lut(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's ``convert`` on every uint8 value: ``float32(x) * alpha + beta``, clipped to 0..255, truncated."""
    values = np.arange(256, dtype=np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(values, 0, 255).astype(np.uint8)


class PhotoMetricDistortion(A.ImageOnlyTransform):
    """mmseg's ``PhotoMetricDistortion`` on uint8 RGB frames, drawn per frame (MRCFA's ``_clips``) or per clip.

    Each step fires with p = 0.5 on its own, in mmseg's order: brightness ``x + U(-32, 32)``; contrast
    ``x * U(0.5, 1.5)`` either now or last (mode drawn 50/50); saturation ``S * U(0.5, 1.5)`` on HSV; hue
    ``(H + randint(-18, 18)) % 180`` in OpenCV's 0..180 units (numpy's randint: -18..17). Every step clips
    to 0..255 and truncates to uint8, and saturation and hue each convert to HSV and back, as mmseg does.
    """

    def __init__(
        self,
        per_frame: bool = True,
        brightness_delta: int = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.per_frame = bool(per_frame)
        self.brightness_delta = brightness_delta
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)

    def draw(self) -> dict[str, Any]:
        """One frame's parameters, drawn in mmseg's call order (None: the step does not fire)."""
        rng = self.random_generator  # numpy Generator: integers/uniform as mmseg's numpy.random randint/uniform
        params: dict[str, Any] = {"brightness": None, "contrast": None, "saturation": None, "hue": None}
        if rng.integers(2):
            params["brightness"] = float(rng.uniform(-self.brightness_delta, self.brightness_delta))
        params["contrast_first"] = bool(rng.integers(2))  # mmseg's mode == 1
        if params["contrast_first"] and rng.integers(2):
            params["contrast"] = float(rng.uniform(*self.contrast_range))
        if rng.integers(2):
            params["saturation"] = float(rng.uniform(*self.saturation_range))
        if rng.integers(2):
            params["hue"] = int(rng.integers(-self.hue_delta, self.hue_delta))
        if not params["contrast_first"] and rng.integers(2):
            params["contrast"] = float(rng.uniform(*self.contrast_range))
        return params

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """One parameter set per frame of the clip (per_frame), or one for all of them."""
        images = data.get("images")
        n = len(images) if images is not None else 1
        frames = [self.draw() for _ in range(n)] if self.per_frame else [self.draw()] * n
        return {"frames": frames}

    def apply(self, img: np.ndarray, frames: Sequence[dict[str, Any]] = (), **params: Any) -> np.ndarray:
        """Distort one frame with the first parameter set."""
        return self.distort(img, frames[0])

    def apply_to_images(self, images: np.ndarray, frames: Sequence[dict[str, Any]] = (), **params: Any) -> np.ndarray:
        """Distort frame t with parameter set t."""
        out = np.stack([self.distort(img, f) for img, f in zip(images, frames, strict=True)])
        return np.require(out, requirements=["C_CONTIGUOUS"])

    @staticmethod
    def distort(img: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        """mmseg's steps on a uint8 RGB frame (each a lookup table of its exact float32 formula)."""
        if img.dtype != np.uint8:
            raise TypeError(f"PhotoMetricDistortion expects uint8 frames (before Normalize), got {img.dtype}")
        if params["brightness"] is not None:
            img = cv2.LUT(img, _affine_lut(beta=params["brightness"]))
        if params["contrast_first"] and params["contrast"] is not None:
            img = cv2.LUT(img, _affine_lut(alpha=params["contrast"]))
        if params["saturation"] is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 1] = cv2.LUT(hsv[..., 1], _affine_lut(alpha=params["saturation"]))
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if params["hue"] is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = cv2.LUT(hsv[..., 0], ((np.arange(256) + params["hue"]) % 180).astype(np.uint8))
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not params["contrast_first"] and params["contrast"] is not None:
            img = cv2.LUT(img, _affine_lut(alpha=params["contrast"]))
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("per_frame", "brightness_delta", "contrast_range", "saturation_range", "hue_delta")


def check_photometric(value: Any) -> str:
    """``data.photometric``: per_frame, per_clip or none; anything else (a bool included) is an error."""
    if not isinstance(value, str) or value not in PHOTOMETRIC_MODES:
        raise ValueError(
            f"data.photometric={value!r}: expected one of {', '.join(PHOTOMETRIC_MODES)} (mmseg's photometric "
            "distortion drawn for every frame, once for the clip, or not at all)"
        )
    return value


class TrainTransform:
    """The training pipeline on a uint8 clip: ``augment`` (rescale, crop, flip, photometric distortion), then padding
    to ``crop_size`` at the bottom/right (frames 0, masks ignore) into uint8 tensors.

    Returns ``images`` (T,3,H,W) uint8, ``masks`` (T,H,W) uint8 when given, and ``valid``: the (h, w) before padding,
    with which the on-device normalisation zeroes the padded pixels (mmseg's ``Pad`` after ``Normalize``).
    """

    def __init__(self, augment: A.Compose, crop_size: Sequence[int]) -> None:
        self.augment = augment
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))

    def set_random_state(self, random_generator: np.random.Generator, py_random: random.Random) -> None:
        """Seed the augmentation's steps (:func:`seed_transform`); padding draws nothing."""
        self.augment.set_random_state(random_generator, py_random)

    def __call__(self, **data: Any) -> dict[str, Any]:
        out = self.augment(**data)
        images = np.asarray(out["images"])
        t, h, w = images.shape[:3]
        size = (max(h, self.crop_size[0]), max(w, self.crop_size[1]))
        frames = torch.zeros((t, images.shape[3], *size), dtype=torch.uint8)
        frames[:, :, :h, :w] = torch.from_numpy(images).permute(0, 3, 1, 2)
        result = {"images": frames, "valid": torch.tensor([h, w])}
        if "masks" in out:
            masks = torch.full((t, *size), IGNORE_INDEX, dtype=torch.uint8)
            masks[:, :h, :w] = torch.from_numpy(np.asarray(out["masks"]))
            result["masks"] = masks
        return result


Seedable = TypeVar("Seedable", A.Compose, TrainTransform)


def seed_transform(transform: Seedable, seed: int | None) -> Seedable:
    """Give ``transform`` and all its steps one shared random stream from ``seed`` (None: fresh entropy).

    albumentations' ``Compose(seed=s)`` gives every step its own generator seeded with the same ``s``, so the
    k-th draw of each step is the same number (the flip decision then follows the rescale ratio); one
    shared stream keeps the steps' draws independent.
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform


def build_train_transform(
    scale: Sequence[int],
    crop_size: Sequence[int],
    ratio_range: Sequence[float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: Photometric = "per_frame",
    seed: int | None = None,
) -> TrainTransform:
    """Training pipeline: rescale x[0.5, 2], crop (cat_max_ratio), flip, photometric distortion, pad (uint8 out;
    normalised on the model's device)."""
    ch, cw = int(crop_size[0]), int(crop_size[1])
    steps: list[A.BasicTransform] = [
        KeepRatioRescale(scale, ratio_range),
        CatMaxRatioCrop(ch, cw, cat_max_ratio),
        A.HorizontalFlip(p=flip_prob),
    ]
    if check_photometric(photometric) != "none":
        steps.append(PhotoMetricDistortion(per_frame=photometric == "per_frame"))
    return seed_transform(TrainTransform(A.Compose(steps, strict=True), (ch, cw)), seed)


def build_eval_transform(scale: Sequence[int], size_divisor: int = 32) -> A.Compose:
    """Evaluation pipeline for frames only: keep-ratio resize to the base size, sides divisible by 32 (uint8
    (T,3,H,W) out; normalised on the model's device)."""
    return A.Compose([KeepRatioRescale(scale), AlignedResize(size_divisor), ToTensorV2()], strict=True)
