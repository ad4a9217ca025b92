"""Data path figures for experiments/speed.md ("Data path"): label map and mask decode per 480p frame, bytes per
training clip crossing from a DataLoader worker and a worker's CPU per clip (before/after the uint8 batches), and the
logits-to-classes share of an evaluated frame.

    PYTHONPATH=src python experiments/data_path.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def best(fn, repeat: int = 20) -> float:
    """Best wall time of ``fn`` in ms over ``repeat`` calls (one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def label_map_and_decode() -> None:
    """int16 fancy index vs uint8 lookup table; PIL vs cv2 decode of a 480x853 palette-free mask PNG."""
    from vss.data.vspw import LabelMap

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 125, (30, 54), dtype=np.uint8)
    raw = cv2.resize(coarse, (853, 480), interpolation=cv2.INTER_NEAREST)
    lm = LabelMap(124)
    old = lambda: lm._lut[raw].astype(np.uint8)  # noqa: E731  today's int16 index + check + cast
    old_check = lambda: (lm._lut[raw] < 0).any()  # noqa: E731
    print(
        f"label map 480x853: int16 index {best(old) + best(old_check):.2f} ms, uint8 LUT {best(lambda: lm(raw)):.2f} ms"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.png"
        Image.fromarray(raw).save(path)
        pil = lambda: np.array(Image.open(path))  # noqa: E731
        cv = lambda: cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # noqa: E731
        assert np.array_equal(pil(), cv())
        print(f"mask decode 480x853 PNG: PIL {best(pil):.2f} ms, cv2 IMREAD_UNCHANGED {best(cv):.2f} ms")


def _fake_vspw(root: Path, videos: int = 2, frames: int = 16) -> None:
    """A 480x853 VSPW-layout set: smooth JPEG frames (upscaled noise, closer to a photo than raw noise), PNG masks."""
    rng = np.random.default_rng(0)
    names = [f"{k}_v" for k in range(videos)]
    for name in names:
        (root / "data" / name / "origin").mkdir(parents=True)
        (root / "data" / name / "mask").mkdir(parents=True)
        for f in range(frames):
            small = rng.integers(0, 256, (30, 54, 3), dtype=np.uint8)
            img = cv2.resize(small, (853, 480), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(root / "data" / name / "origin" / f"{f:08d}.jpg"), img)
            mask = cv2.resize(
                rng.integers(1, 125, (12, 22), dtype=np.uint8), (853, 480), interpolation=cv2.INTER_NEAREST
            )
            Image.fromarray(mask).save(root / "data" / name / "mask" / f"{f:08d}.png")
    (root / "train.txt").write_text("".join(f"{n}\n" for n in names))


def _old_dataset(new):
    """Today's TrainClips before the lean data path: Normalize + pad in the worker, float32 frames, int64 labels."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    from vss.data.datasets import TrainClips, _load_clip
    from vss.data.transforms import IMAGENET_MEAN, IMAGENET_STD, seed_transform

    ch, cw = new.transform.crop_size
    pad = A.PadIfNeeded(ch, cw, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=255)
    steps = [*new.transform.augment.transforms, A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), pad, ToTensorV2()]

    class OldTrainClips(TrainClips):
        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            video = self.videos[i % len(self.videos)]
            indices = self.sampler.train_indices(len(video), self.rng, self.targets[i % len(self.videos)])
            frames, labels, _ = _load_clip(video, indices, self.label_map, self.read_label)
            out = self.transform(images=frames, masks=labels)
            return {"images": out["images"].float(), "labels": torch.as_tensor(out["masks"]).long()}

    tf = seed_transform(A.Compose(steps, strict=True), 0)
    return OldTrainClips(new.videos, new.sampler, new.label_map, tf, new.repeat, new.read_label, 0)


def clip_bytes_and_worker_cpu(rounds: int = 5, clips: int = 8) -> None:
    """MRCFA-B1's training data (4-frame clips, 480x480 crop, batch 2): the pickled size of a collated batch, the
    bytes the DataLoader puts in shared memory, and a worker's CPU per clip (``__getitem__``, then collate + share)
    before (float32 + int64) and after (uint8 + uint8), in interleaved rounds (medians)."""
    import io
    import pickle
    import statistics
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  registers the tensor reductions (storages into shared memory)
    from torch.utils.data import default_collate

    from vss.data.datamodule import VSSDataModule

    torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _fake_vspw(root)
        dm = VSSDataModule(str(root), num_classes=124, clip={"offsets": [-9, -6, -3]}, num_workers=0, seed=0)
        new = dm.train_dataset()
        datasets = {"before": _old_dataset(new), "after": new}
        cpu: dict[str, list[float]] = {k: [] for k in datasets}
        share: dict[str, list[float]] = {k: [] for k in datasets}
        size: dict[str, tuple[int, int]] = {}
        for _ in range(rounds):
            for name, ds in datasets.items():
                t = time.process_time()
                items = [ds[i] for i in range(clips)]
                cpu[name].append((time.process_time() - t) / clips)
                t = time.process_time()
                for k in range(0, clips, 2):
                    batch = default_collate(items[k : k + 2])
                    ForkingPickler(io.BytesIO(), pickle.HIGHEST_PROTOCOL).dump(batch)  # storages into shared memory
                share[name].append((time.process_time() - t) / clips)
                batch = default_collate(items[:2])
                shm = sum(v.numel() * v.element_size() for v in batch.values())
                size[name] = (len(pickle.dumps(batch, pickle.HIGHEST_PROTOCOL)), shm)
    for name in datasets:
        ms, share_ms = 1e3 * statistics.median(cpu[name]), 1e3 * statistics.median(share[name])
        pickled, shm = size[name]
        print(
            f"{name}: batch of 2 clips pickled {pickled / 1e6:.1f} MB ({pickled / 2e6:.1f} MB per clip), shared "
            f"memory {shm / 2e6:.1f} MB per clip; worker CPU per clip: __getitem__ {ms:.0f} ms + collate/share "
            f"{share_ms:.1f} ms = {ms + share_ms:.0f} ms ({1e3 / (ms + share_ms):.1f} clips/s per worker core)"
        )


def peak_rss(mode: str) -> None:
    """Child process: one 124-class 480p frame's class map, then print the peak RSS (MB)."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    logits = F.interpolate(torch.randn(1, 124, 8, 14, generator=gen) * 5, size=(120, 216), mode="bicubic")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = _status("VmRSS")
    if mode == "plain":
        _ = F.interpolate(logits, size=(480, 853), mode="bilinear", align_corners=False).max(1).indices
    else:
        from vss.models.ops.classes import upsampled_class_map

        upsampled_class_map(logits, (480, 853))
    print((_status("VmHWM") - base) / 1024)


def _status(key: str) -> int:
    """A kB field of /proc/self/status."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
    return int(line.split()[1])


def logits_to_classes() -> None:
    """Time (1 thread) and extra peak memory of resize-then-argmax vs the banded path for one 480p frame."""
    from vss.models.ops.classes import upsampled_class_map

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    logits = F.interpolate(torch.randn(1, 124, 8, 14, generator=gen) * 5, size=(120, 216), mode="bicubic")
    plain = lambda: F.interpolate(logits, size=(480, 853), mode="bilinear", align_corners=False).max(1).indices  # noqa: E731
    banded = lambda: upsampled_class_map(logits, (480, 853))  # noqa: E731
    assert torch.equal(plain(), banded())
    print(
        f"logits-to-classes 124x120x216 -> 480x853 (1 thread): resize+argmax {best(plain, 5):.0f} ms, "
        f"banded {best(banded, 5):.0f} ms"
    )
    for mode in ("plain", "banded"):
        out = subprocess.run([sys.executable, __file__, "--peak", mode], capture_output=True, text=True, check=True)
        print(f"  peak memory above the logits, {mode}: {float(out.stdout.split()[-1]):.0f} MB")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak":
        peak_rss(sys.argv[2])
    else:
        label_map_and_decode()
        clip_bytes_and_worker_cpu()
        logits_to_classes()
