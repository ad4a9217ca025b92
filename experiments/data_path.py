"""Data path figures for experiments/speed.md ("Data path"): label map and mask decode per 480p frame, bytes per
training clip crossing from a DataLoader worker, and the logits-to-classes share of an evaluated frame.

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


def clip_bytes() -> None:
    """Bytes of one MRCFA training clip (4 frames, 480x480 crop) as it crosses from the worker."""
    t, h, w = 4, 480, 480
    today = t * 3 * h * w * 4 + t * h * w * 8  # float32 frames + int64 labels
    lean = t * 3 * h * w + t * h * w  # uint8 frames + uint8 labels
    print(f"bytes per clip: float32 + int64 {today / 1e6:.1f} MB, uint8 + uint8 {lean / 1e6:.1f} MB")


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
        clip_bytes()
        logits_to_classes()
