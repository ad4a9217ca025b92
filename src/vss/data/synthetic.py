"""Embedded synthetic video dataset, written in the VSPW layout (the default training data).

Coloured objects (discs, squares, ellipses) move at constant velocity with a little jitter over a
slowly drifting grey texture, bouncing off the frame borders. An object's class is told apart
**only by its colour** (hue); shape, size, speed and position are drawn independently of the class.
On *hidden* frames the colour cue is removed, so a single frame cannot tell the class:

- **fog**: one object is covered by a neutral grey patch (``fog_grey``) of its exact silhouette;
  the same grey and the same sensor noise for every class.
- **storm**: a frame-level event; every object turns fog-grey, then the whole frame is blurred
  (``storm_blur``) and hit by a noise burst (``storm_noise``).

The masks always carry the true class. Hidden episodes last ``min_hide..max_hide`` frames and are
separated (from each other and from both ends of the video) by at least ``min_visible`` visible
frames. With the defaults (``max_hide <= 6``, ``min_visible >= 3``) every hidden frame ``t`` has a
visible frame among ``t-3, t-6`` (and likewise among ``t+3, t+6`` for reversed clips), so a model
with the reference frames ``t-9, t-6, t-3`` can recover the class and a single-frame model cannot.

Raw mask values (VSPW encoding, read with ``LabelMap(num_classes, reduce_zero_label=True)``):
1 = background, 2..K = object classes (training ids 0..K-1, ``K = num_classes = 1 + object_classes``),
0 = "others" (small chequered distractor blobs, ignored), 255 = void (the 1-pixel blended ring
around each distractor, ignored).

Layout (see :mod:`vss.data.vspw`)::

    root/meta.json                                    knobs + generator version (the cache key)
    root/{train,val}.txt                              video ids, e.g. ``train_000``
    root/data/<video>/origin/<8-digit frame>.jpg      frames (numbering starts at a random offset)
    root/data/<video>/mask/<same stem>.png            single-channel uint8 masks
    root/data/<video>/hidden.json                     per-object class, shape and hidden frames

Everything is deterministic from ``seed``: video ``i`` of split ``s`` uses
``numpy.random.default_rng([seed, split_code(s), i])``. :func:`render_video` regenerates a video
in memory (frames, masks, instance ids, hidden schedule) without touching the disk.

Knobs (:class:`SyntheticConfig`; ``ensure_synthetic(root, **knobs)``):

=================  ========  ======================================================================
name               default   meaning
=================  ========  ======================================================================
seed               0         master seed; every video is seeded from (seed, split, video index)
height             64        frame height in pixels
width              64        frame width in pixels
train_videos       24        number of videos in ``train.txt``
val_videos         8         number of videos in ``val.txt``
min_frames         24        fewest frames per video
max_frames         30        most frames per video (length drawn uniformly in min..max)
object_classes     4         object classes (1..8): red, green, blue, yellow, magenta, cyan, ...;
                             ``num_classes = 1 + object_classes`` (background is class 0)
min_objects        2         fewest moving objects per video
max_objects        3         most moving objects per video
min_size           0.10      smallest object radius, as a fraction of min(height, width)
max_size           0.20      largest object radius, as a fraction of min(height, width)
min_speed          0.01      slowest object speed, fraction of min(height, width) per frame
max_speed          0.03      fastest object speed, fraction of min(height, width) per frame
jitter             0.15      std (pixels) of the random per-frame perturbation of the position
bg_drift           0.25      background texture drift speed, pixels per frame
colour_jitter      20.0      per-object uniform offset (+-, per RGB channel) from the class colour
noise_std          4.0       std of the per-pixel Gaussian sensor noise on every frame
hide_prob          0.12      per-frame chance that a fog episode starts for an object
storm_prob         0.03      per-frame chance that a storm episode starts (all objects hidden)
min_hide           2         shortest hidden episode, frames
max_hide           6         longest hidden run (fog and storm together), frames
min_visible        3         fewest visible frames between hidden runs and at both video ends
fog_grey           170       grey level of a hidden (fogged) object
storm_noise        40.0      std of the extra Gaussian noise on storm frames
storm_blur         1.5       Gaussian blur sigma (pixels) on storm frames
min_distractors    1         fewest "others" blobs (mask 0) per video
max_distractors    2         most "others" blobs per video
void_ring          True      label the blended 1-pixel ring around each blob as void (255)
image_format       "jpg"     frame files: "jpg" (quality ``jpeg_quality``, 4:4:4) or "png"
jpeg_quality       95        JPEG quality of the frames
label_every        1         write masks only for frames 0, K, 2K, ... of each video (sparse labels,
                             like Cityscapes / CamVid); 1 = every frame
=================  ========  ======================================================================

Every object class appears in every split as long as the split has at least ``object_classes``
videos (the first object of video ``i`` has class ``i mod object_classes``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

GENERATOR = "vss.data.synthetic"
GENERATOR_VERSION = "1"
SPLITS = ("train", "val")
_SPLIT_CODES = {"train": 0, "val": 1}

#: Object class colours (RGB), in class order.
OBJECT_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 200, 60),
    "blue": (55, 85, 235),
    "yellow": (230, 210, 35),
    "magenta": (215, 55, 215),
    "cyan": (40, 205, 215),
    "orange": (240, 135, 25),
    "purple": (125, 55, 195),
}
#: Names of every class the generator can produce (training id order).
ALL_SYNTHETIC_CLASSES: tuple[str, ...] = ("background", *OBJECT_PALETTE)
SHAPES = ("disc", "square", "ellipse")


@dataclass(frozen=True)
class SyntheticConfig:
    """All knobs of the synthetic dataset (see the module docstring for the table)."""

    seed: int = 0
    height: int = 64
    width: int = 64
    train_videos: int = 24
    val_videos: int = 8
    min_frames: int = 24
    max_frames: int = 30
    object_classes: int = 4
    min_objects: int = 2
    max_objects: int = 3
    min_size: float = 0.10
    max_size: float = 0.20
    min_speed: float = 0.01
    max_speed: float = 0.03
    jitter: float = 0.15
    bg_drift: float = 0.25
    colour_jitter: float = 20.0
    noise_std: float = 4.0
    hide_prob: float = 0.12
    storm_prob: float = 0.03
    min_hide: int = 2
    max_hide: int = 6
    min_visible: int = 3
    fog_grey: int = 170
    storm_noise: float = 40.0
    storm_blur: float = 1.5
    min_distractors: int = 1
    max_distractors: int = 2
    void_ring: bool = True
    image_format: str = "jpg"
    jpeg_quality: int = 95
    label_every: int = 1

    def __post_init__(self) -> None:
        """Reject knob values the generator cannot honour."""
        errors = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                errors.append(msg)

        need(self.height >= 16 and self.width >= 16, "height and width must be >= 16")
        need(self.train_videos >= 0 and self.val_videos >= 0, "train_videos/val_videos must be >= 0")
        need(self.train_videos + self.val_videos >= 1, "at least one video is needed")
        need(1 <= self.min_frames <= self.max_frames, "need 1 <= min_frames <= max_frames")
        need(
            1 <= self.object_classes <= len(OBJECT_PALETTE),
            f"object_classes must be 1..{len(OBJECT_PALETTE)}",
        )
        need(0 <= self.min_objects <= self.max_objects, "need 0 <= min_objects <= max_objects")
        need(0 < self.min_size <= self.max_size <= 0.3, "need 0 < min_size <= max_size <= 0.3")
        need(0 <= self.min_speed <= self.max_speed, "need 0 <= min_speed <= max_speed")
        need(self.jitter >= 0 and self.bg_drift >= 0, "jitter and bg_drift must be >= 0")
        need(self.colour_jitter >= 0 and self.noise_std >= 0, "colour_jitter and noise_std must be >= 0")
        need(0 <= self.hide_prob <= 1 and 0 <= self.storm_prob <= 1, "hide_prob/storm_prob must be in 0..1")
        need(1 <= self.min_hide <= self.max_hide, "need 1 <= min_hide <= max_hide")
        need(self.min_visible >= 1, "min_visible must be >= 1")
        need(0 <= self.fog_grey <= 255, "fog_grey must be 0..255")
        need(self.storm_noise >= 0 and self.storm_blur >= 0, "storm_noise and storm_blur must be >= 0")
        need(0 <= self.min_distractors <= self.max_distractors, "need 0 <= min_distractors <= max_distractors")
        need(self.image_format in ("jpg", "png"), "image_format must be 'jpg' or 'png'")
        need(1 <= self.jpeg_quality <= 100, "jpeg_quality must be 1..100")
        need(isinstance(self.label_every, int) and self.label_every >= 1, "label_every must be an integer >= 1")
        if errors:
            raise ValueError("invalid SyntheticConfig: " + "; ".join(errors))

    @property
    def num_classes(self) -> int:
        """Training classes after the VSPW label map (background + object classes)."""
        return 1 + self.object_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in training-id order."""
        return ALL_SYNTHETIC_CLASSES[: self.num_classes]

    def num_videos(self, split: str) -> int:
        """Number of videos of ``split``."""
        return {"train": self.train_videos, "val": self.val_videos}[split]

    def knobs(self) -> dict:
        """The knobs as a JSON-ready dict."""
        return asdict(self)


#: Class names of the default configuration (training-id order).
SYNTHETIC_CLASSES: tuple[str, ...] = SyntheticConfig().class_names


@dataclass(frozen=True)
class SyntheticVideo:
    """One rendered video held in memory."""

    name: str
    stems: tuple[str, ...]  # frame file stems (8-digit numbers)
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    masks: np.ndarray  # (T, H, W) uint8 raw VSPW values
    instances: np.ndarray  # (T, H, W) int8: object index owning the pixel, -1 elsewhere
    classes: tuple[int, ...]  # raw mask value of each object (2..K)
    shapes: tuple[str, ...]  # shape of each object
    hidden: np.ndarray  # (T, n_objects) bool: colour cue hidden (fog or storm)
    storm: np.ndarray  # (T,) bool: storm frames


def video_name(split: str, index: int) -> str:
    """Video id of video ``index`` of ``split``."""
    return f"{split}_{index:03d}"


def _runs(hidden: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True as (start, end_exclusive)."""
    padded = np.concatenate([[False], hidden, [False]]).astype(np.int8)
    d = np.diff(padded)
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True))


def _schedule_ok(hidden: np.ndarray, cfg: SyntheticConfig) -> bool:
    """Whether every hidden run is short enough and framed by enough visible frames."""
    runs = _runs(hidden)
    n = len(hidden)
    for i, (s, e) in enumerate(runs):
        if e - s > cfg.max_hide or s < cfg.min_visible or e > n - cfg.min_visible:
            return False
        if i and s - runs[i - 1][1] < cfg.min_visible:
            return False
    return True


def _episodes(rng: np.random.Generator, n: int, prob: float, cfg: SyntheticConfig, base: np.ndarray) -> np.ndarray:
    """Add random hidden episodes to ``base`` (kept valid w.r.t. the run constraints); return the union."""
    hidden = base.copy()
    t = cfg.min_visible
    while t < n - cfg.min_visible:
        if rng.random() < prob:
            length = int(rng.integers(cfg.min_hide, cfg.max_hide + 1))
            cand = hidden.copy()
            cand[t : t + length] = True
            if _schedule_ok(cand, cfg):
                hidden = cand
                t += length + cfg.min_visible
                continue
        t += 1
    return hidden


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth multi-scale grey texture with a faint tint, float32 HxWx3 in about 40..160."""
    acc = np.zeros((h, w), np.float32)
    for cell, weight in ((16, 1.0), (8, 0.6), (4, 0.35), (2, 0.2)):
        small = rng.standard_normal((max(2, h // cell), max(2, w // cell))).astype(np.float32)
        acc += weight * cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    acc = (acc - acc.mean()) / (acc.std() + 1e-6)
    base = 100.0 + 28.0 * np.clip(acc, -2.2, 2.2)
    tint = rng.uniform(-8.0, 8.0, 3).astype(np.float32)
    return base[..., None] + tint[None, None, :]


def _shape_mask(
    xs: np.ndarray, ys: np.ndarray, shape: str, cx: float, cy: float, r: float, aspect: float, angle: float
) -> np.ndarray:
    """Boolean mask of a shape centred at (cx, cy) with radius ``r``, rotated by ``angle``."""
    dx, dy = xs - cx, ys - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if shape == "disc":
        return u * u + v * v <= r * r
    if shape == "square":
        half = 0.85 * r
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    return (u / r) ** 2 + (v / (aspect * r)) ** 2 <= 1.0


def _bounding_radius(shape: str, r: float) -> float:
    """Radius of a circle that contains the shape at any rotation."""
    return 0.85 * r * np.sqrt(2.0) if shape == "square" else r


def _trajectory(
    rng: np.random.Generator, n: int, h: int, w: int, radius: float, speed: float, jitter: float
) -> np.ndarray:
    """Positions (n, 2) of a point moving at constant velocity + jitter, bouncing inside the frame."""
    lo = np.array([radius, radius])
    hi = np.array([w - 1 - radius, h - 1 - radius])
    pos = rng.uniform(lo, hi)
    theta = rng.uniform(0, 2 * np.pi)
    vel = speed * np.array([np.cos(theta), np.sin(theta)])
    out = np.empty((n, 2))
    for t in range(n):
        out[t] = pos
        pos = pos + vel + rng.normal(0.0, jitter, 2)
        for k in range(2):
            if pos[k] < lo[k]:
                pos[k], vel[k] = 2 * lo[k] - pos[k], abs(vel[k])
            elif pos[k] > hi[k]:
                pos[k], vel[k] = 2 * hi[k] - pos[k], -abs(vel[k])
            pos[k] = min(max(pos[k], lo[k]), hi[k])
    return out


def render_video(cfg: SyntheticConfig, split: str, index: int) -> SyntheticVideo:
    """Render video ``index`` of ``split`` in memory, deterministically from ``cfg.seed``."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([cfg.seed, _SPLIT_CODES[split], index])
    h, w = cfg.height, cfg.width
    side = min(h, w)
    n = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
    first = int(rng.integers(0, 1000))
    stems = tuple(f"{first + t:08d}" for t in range(n))

    # background: a padded texture cropped at a drifting sub-pixel offset
    pad = int(np.ceil(cfg.bg_drift * n)) + 2
    tex = _texture(rng, h + 2 * pad, w + 2 * pad)
    drift_dir = rng.uniform(0, 2 * np.pi)
    drift = cfg.bg_drift * np.array([np.cos(drift_dir), np.sin(drift_dir)])

    # objects: class independent of shape, size and motion
    n_obj = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    palette = np.array(list(OBJECT_PALETTE.values())[: cfg.object_classes], np.float32)
    objects = []
    for i in range(n_obj):
        cls = index % cfg.object_classes if i == 0 else int(rng.integers(cfg.object_classes))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        r = float(rng.uniform(cfg.min_size, cfg.max_size)) * side
        aspect = float(rng.uniform(0.45, 0.8))
        angle0 = float(rng.uniform(0, np.pi))
        omega = float(rng.uniform(-0.06, 0.06))
        colour = palette[cls] + rng.uniform(-cfg.colour_jitter, cfg.colour_jitter, 3).astype(np.float32)
        speed = float(rng.uniform(cfg.min_speed, cfg.max_speed)) * side
        path = _trajectory(rng, n, h, w, _bounding_radius(shape, r), speed, cfg.jitter)
        objects.append((cls, shape, r, aspect, angle0, omega, np.clip(colour, 0, 255), path))

    # "others" distractor blobs: small chequered discs with a blended (void) ring
    n_dis = int(rng.integers(cfg.min_distractors, cfg.max_distractors + 1))
    distractors = []
    for _ in range(n_dis):
        r = float(rng.uniform(0.03, 0.05)) * side + 1.0
        path = _trajectory(rng, n, h, w, r + 1.0, float(rng.uniform(0.0, 0.01)) * side, cfg.jitter)
        distractors.append((r, path))

    # hidden schedule: storm episodes (all objects), then per-object fog episodes
    none = np.zeros(n, bool)
    storm = _episodes(rng, n, cfg.storm_prob, cfg, none)
    hidden = np.zeros((n, n_obj), bool)
    for i in range(n_obj):
        hidden[:, i] = _episodes(rng, n, cfg.hide_prob, cfg, storm)

    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    checker = ((xs.astype(int) + ys.astype(int)) % 2).astype(bool)
    frames = np.empty((n, h, w, 3), np.uint8)
    masks = np.empty((n, h, w), np.uint8)
    instances = np.empty((n, h, w), np.int8)
    fog = np.full(3, float(cfg.fog_grey), np.float32)
    for t in range(n):
        ox, oy = drift * t
        warp = np.array([[1, 0, pad + ox], [0, 1, pad + oy]], np.float32)
        img = cv2.warpAffine(
            tex, warp, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT
        )
        mask = np.ones((h, w), np.uint8)
        inst = np.full((h, w), -1, np.int8)
        for i, (cls, shape, r, aspect, angle0, omega, colour, path) in enumerate(objects):
            m = _shape_mask(xs, ys, shape, path[t, 0], path[t, 1], r, aspect, angle0 + omega * t)
            img[m] = fog if hidden[t, i] else colour
            mask[m] = 2 + cls
            inst[m] = i
        for r, path in distractors:
            d2 = (xs - path[t, 0]) ** 2 + (ys - path[t, 1]) ** 2
            core = d2 <= r * r
            ring = (d2 <= (r + 1.0) ** 2) & ~core
            img[core] = np.where(checker[core, None], 235.0, 25.0)
            img[ring] = 0.5 * img[ring] + 0.5 * 130.0
            mask[core] = 0
            inst[core | ring] = -1
            if cfg.void_ring:
                mask[ring] = 255
        img += rng.normal(0.0, cfg.noise_std, img.shape).astype(np.float32)
        if storm[t]:
            if cfg.storm_blur > 0:
                img = cv2.GaussianBlur(img, (0, 0), cfg.storm_blur, borderType=cv2.BORDER_REFLECT)
            img += rng.normal(0.0, cfg.storm_noise, img.shape).astype(np.float32)
        frames[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        masks[t] = mask
        instances[t] = inst
    return SyntheticVideo(
        name=video_name(split, index),
        stems=stems,
        frames=frames,
        masks=masks,
        instances=instances,
        classes=tuple(2 + o[0] for o in objects),
        shapes=tuple(o[1] for o in objects),
        hidden=hidden,
        storm=storm,
    )


def hidden_info(video: SyntheticVideo, cfg: SyntheticConfig) -> dict:
    """The JSON-ready hidden schedule of a rendered video (what ``hidden.json`` holds)."""
    return {
        "video": video.name,
        "frames": list(video.stems),
        "storm": np.flatnonzero(video.storm).tolist(),
        "objects": [
            {
                "index": i,
                "raw_value": raw,
                "train_id": raw - 1,
                "class_name": cfg.class_names[raw - 1],
                "shape": video.shapes[i],
                "hidden": np.flatnonzero(video.hidden[:, i]).tolist(),
            }
            for i, raw in enumerate(video.classes)
        ],
    }


def read_hidden(root: Path | str, video: str) -> dict:
    """Load ``root/data/<video>/hidden.json`` (frame indices are 0-based positions in the video)."""
    return json.loads((Path(root) / "data" / video / "hidden.json").read_text())


def _write_video(vdir: Path, video: SyntheticVideo, cfg: SyntheticConfig) -> None:
    """Write one rendered video's frames, masks and hidden.json under ``vdir``."""
    origin, mask_dir = vdir / "origin", vdir / "mask"
    origin.mkdir(parents=True)
    mask_dir.mkdir()
    if cfg.image_format == "jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, cfg.jpeg_quality]
        if hasattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR"):
            params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    else:
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    for t, (stem, frame, mask) in enumerate(zip(video.stems, video.frames, video.masks, strict=True)):
        fpath = origin / f"{stem}.{cfg.image_format}"
        mpath = mask_dir / f"{stem}.png"
        if not cv2.imwrite(str(fpath), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), params):
            raise OSError(f"cannot write {fpath}")
        if t % cfg.label_every:  # sparse labels: only every label_every-th frame (0, K, 2K, ...) has a mask
            continue
        if not cv2.imwrite(str(mpath), mask, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
            raise OSError(f"cannot write {mpath}")
    (vdir / "hidden.json").write_text(json.dumps(hidden_info(video, cfg), indent=1) + "\n")


def _meta(cfg: SyntheticConfig) -> dict:
    """Contents of ``meta.json``; ``generator``, ``version`` and ``knobs`` form the cache key."""
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "knobs": cfg.knobs(),
        "num_classes": cfg.num_classes,
        "class_names": list(cfg.class_names),
        "label_map": "vspw (reduce_zero_label): 0 others -> ignore, 255 void -> ignore, k -> k-1",
    }


def _read_meta(root: Path) -> dict | None:
    """``root/meta.json`` parsed, or None when missing or unreadable."""
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_current(root: Path, cfg: SyntheticConfig) -> bool:
    """Whether ``root`` already holds the dataset generated from ``cfg`` by this generator version."""
    meta = _read_meta(root)
    want = json.loads(json.dumps(_meta(cfg)))
    return meta is not None and all(meta.get(k) == want[k] for k in ("generator", "version", "knobs"))


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold an exclusive flock on the sibling ``.<name>.lock`` file (serialises generators of ``root``)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _generate_locked(root: Path, cfg: SyntheticConfig, progress: bool) -> Path:
    """Write the dataset into a sibling temporary directory, then swap it into place (lock held)."""
    if root.exists():
        meta = _read_meta(root)
        ours = meta is not None and meta.get("generator") == GENERATOR
        if not root.is_dir() or not (ours or not any(root.iterdir())):
            raise FileExistsError(
                f"refusing to overwrite {root}: it is not a dataset written by {GENERATOR} "
                "(no matching meta.json); choose another directory"
            )
    for stale in root.parent.glob(f".{root.name}.tmp-*"):  # left over by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.parent.glob(f".{root.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = root.parent / f".{root.name}.tmp-{tag}"
    try:
        tmp.mkdir()
        jobs = [(s, i) for s in SPLITS for i in range(cfg.num_videos(s))]
        for split in SPLITS:
            names = [video_name(split, i) for i in range(cfg.num_videos(split))]
            (tmp / f"{split}.txt").write_text("".join(f"{nm}\n" for nm in names))
        for split, i in tqdm(jobs, desc=f"synthetic dataset -> {root}", unit="video", disable=not progress):
            _write_video(tmp / "data" / video_name(split, i), render_video(cfg, split, i), cfg)
        (tmp / "meta.json").write_text(json.dumps(_meta(cfg), indent=1) + "\n")  # written last
        if root.exists():
            old = root.parent / f".{root.name}.old-{tag}"
            os.rename(root, old)
            os.rename(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def generate(root: Path | str, cfg: SyntheticConfig, progress: bool = True) -> Path:
    """Write the synthetic dataset for ``cfg`` at ``root`` (atomically, replacing an older one)."""
    root = Path(root).absolute()
    with _locked(root):
        return _generate_locked(root, cfg, progress)


def ensure_synthetic(root: Path | str, progress: bool = True, **knobs) -> Path:
    """Return ``root`` holding the dataset for ``knobs``; generate it only if meta.json does not match."""
    names = {f.name for f in fields(SyntheticConfig)}
    unknown = sorted(set(knobs) - names)
    if unknown:
        raise TypeError(f"unknown synthetic dataset knobs {unknown}; known: {sorted(names)}")
    cfg = SyntheticConfig(**knobs)
    root = Path(root).absolute()
    if _is_current(root, cfg):
        return root
    with _locked(root):
        if _is_current(root, cfg):  # another process generated it while we waited
            return root
        return _generate_locked(root, cfg, progress)


def load_config(root: Path | str) -> SyntheticConfig | None:
    """The config a synthetic dataset at ``root`` was generated with, or None if it is not one."""
    meta = _read_meta(Path(root))
    if meta is None or meta.get("generator") != GENERATOR:
        return None
    names = {f.name for f in fields(SyntheticConfig)}
    return SyntheticConfig(**{k: v for k, v in meta.get("knobs", {}).items() if k in names})
