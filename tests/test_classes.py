"""Banded logits-to-classes: the same class ids, bit for bit, as resize-then-argmax (vss.models.ops.classes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vss.models.ops import classes
from vss.models.ops.classes import banded_applies, emulation_matches, upsampled_class_map


@pytest.fixture(autouse=True)
def _banded_whatever_the_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The small maps below exercise the banded path (by default frames this small take resize-then-argmax)."""
    monkeypatch.setattr(classes, "PLAIN_BYTES", 0)


def reference(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Today's path: the whole (B,C,H,W) bilinear map, then the first maximum."""
    return F.interpolate(logits.contiguous(), size=size, mode="bilinear", align_corners=False).max(1).indices


def smooth(b: int, c: int, h: int, w: int, gen: torch.Generator, gain: float = 5.0) -> torch.Tensor:
    """Logits with regions and borders, as a segmentation head gives (random noise has no sure blocks)."""
    coarse = torch.randn(b, c, max(2, h // 8), max(2, w // 8), generator=gen) * gain
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)


CASES = [  # (B, C, h, w) -> (H, W): odd sizes, non-integer factors, downscaling along one axis
    ((1, 124, 30, 54), (240, 427)),
    ((2, 19, 17, 33), (129, 257)),
    ((1, 7, 13, 9), (101, 77)),
    ((1, 5, 40, 60), (97, 60)),  # width unchanged: the kernel's copy path
    ((1, 4, 64, 48), (51, 200)),  # fewer output rows than input rows
]


@pytest.mark.parametrize("path", ["blocks", "classes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_banded_ids_equal_resize_then_argmax(case, dtype, path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both exact paths: candidates interpolated per block, or the classes that lead somewhere resized a few at a
    time (the choice between them is a cost estimate: forced here)."""
    monkeypatch.setattr(classes, "BLOCK_COST", 0 if path == "blocks" else 10**9)
    (b, c, h, w), size = case
    gen = torch.Generator().manual_seed(c * h + w)
    for logits in (smooth(b, c, h, w, gen), torch.randn(b, c, h, w, generator=gen)):
        x = logits.to(dtype)
        assert banded_applies(x, size)
        for chunk in (300, 1 << 18):  # one block / one class at a time, and the default
            assert torch.equal(upsampled_class_map(x, size, chunk=chunk), reference(x, size))


def test_ties_keep_the_first_class() -> None:
    gen = torch.Generator().manual_seed(3)
    const = torch.zeros(1, 6, 11, 13)  # every class tied everywhere: class 0
    assert torch.equal(upsampled_class_map(const, (90, 101)), torch.zeros(1, 90, 101, dtype=torch.long))
    x = smooth(1, 6, 11, 13, gen)
    x[:, 4] = x[:, 1]  # a duplicated channel: 1 wins wherever 4 would
    x[:, 5] = x[:, :5].amax(1)  # ties the leader at every input pixel (wins only between two leaders)
    ids = upsampled_class_map(x, (90, 101), chunk=5)
    assert torch.equal(ids, reference(x, (90, 101)))
    assert not bool((ids == 4).any())


def test_near_ties_at_rounding_level_follow_the_kernel() -> None:
    gen = torch.Generator().manual_seed(4)
    base = smooth(1, 8, 15, 21, gen)
    x = base.clone()
    x[:, 3] = base.amax(1) * (1 + 2**-23 * torch.randint(-2, 3, (1, 15, 21), generator=gen))  # within an ulp or two
    assert torch.equal(upsampled_class_map(x, (150, 203)), reference(x, (150, 203)))


def test_paths_that_fall_back_give_the_same_ids() -> None:
    gen = torch.Generator().manual_seed(5)
    for logits, size in (
        (torch.randn(1, 1, 9, 10, generator=gen), (80, 90)),  # C = 1
        (torch.randn(1, 3, 9, 10, generator=gen), (80, 90)),  # C = 3
        (torch.randn(2, 6, 9, 10, generator=gen), (50, 60)),  # H + W <= 128: PyTorch's channels-last kernel
        (torch.randn(1, 6, 9, 10, generator=gen).double(), (80, 90)),  # float64
    ):
        assert not banded_applies(logits, size)
        assert torch.equal(upsampled_class_map(logits, size), reference(logits, size))
    x = torch.randn(1, 6, 9, 10, generator=gen)
    x[0, 2, 3, 3] = float("nan")
    x[0, 1, 5, 5] = float("inf")
    assert torch.equal(upsampled_class_map(x, (80, 90)), reference(x, (80, 90)))
    assert torch.equal(upsampled_class_map(x, (9, 10)), x.max(1).indices)  # same size: no resize


def test_classes_that_lead_nowhere_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decided map (two strong classes among 40) resizes only those two, padded to four channels."""
    monkeypatch.setattr(classes, "BLOCK_COST", 10**9)
    resized: list[int] = []
    real = F.interpolate
    monkeypatch.setattr(classes.F, "interpolate", lambda t, **kw: resized.append(t.shape[1]) or real(t, **kw))
    x = torch.randn(1, 40, 12, 16, generator=torch.Generator().manual_seed(7))
    x[:, 7, :, :8] += 50
    x[:, 31, :, 8:] += 50
    ids = upsampled_class_map(x, (96, 128))
    assert resized == [4]
    assert torch.equal(ids, reference(x, (96, 128))) and set(ids.unique().tolist()) == {7, 31}


def test_emulation_is_checked_against_the_kernel() -> None:
    assert emulation_matches("cpu", torch.float32)  # the banded path is in use on this machine


def test_small_frames_take_resize_then_argmax_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames whose upsampled map fits PLAIN_BYTES: the plain kernel frame by frame (no emulation), the same ids."""
    monkeypatch.setattr(classes, "PLAIN_BYTES", 5 * 97 * 131 * 4)
    monkeypatch.setattr(classes, "_candidates", None)  # the banded path would fail
    x = torch.randn(3, 5, 20, 30, generator=torch.Generator().manual_seed(6))
    assert torch.equal(upsampled_class_map(x, (97, 131)), reference(x, (97, 131)))
    with pytest.raises(TypeError):  # one class more: over the budget, banded
        upsampled_class_map(torch.randn(1, 6, 20, 30), (97, 131))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["integer ties", "offset", "ulp-level rival", "tiny"])
def test_margins_hold_at_each_dtypes_rounding(kind: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The margins come from the dtype's own rounding: exact ties, values where rounding matters (a large offset),
    a rival class within an ulp of the leader, and tiny logits all give the kernel's ids, on both exact paths."""
    gen = torch.Generator().manual_seed(11)
    for seed in range(4):
        (b, c, h, w), size = ((1, 9 + seed, 11 + 3 * seed, 17 - seed), (83 + 7 * seed, 131 - 9 * seed))
        base = smooth(b, c, h, w, gen, gain=2.0 + 4 * seed)
        if kind == "integer ties":
            base = base.round()
        elif kind == "offset":
            base = (base * 4).round() / 4 + 1000
        elif kind == "ulp-level rival":
            base[:, 1] = base[:, 0] * (1 + 2**-22 * torch.randn(base[:, 0].shape, generator=gen))
        else:
            base = base * 1e-3
        x = base.to(dtype)
        for cost in (0, 10**9):
            monkeypatch.setattr(classes, "BLOCK_COST", cost)
            assert torch.equal(upsampled_class_map(x, size), reference(x, size)), (kind, dtype, seed, cost)


def test_huge_logits_take_resize_then_argmax(monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits near the padding value (|x| >= LARGEST) leave the block path: the plain kernel decides."""
    monkeypatch.setattr(classes, "_fill", None)  # the block path would fail
    x = smooth(1, 6, 12, 14, torch.Generator().manual_seed(12)) * 2.0**98
    assert float(x.abs().max()) >= classes.LARGEST
    assert torch.equal(upsampled_class_map(x, (90, 101)), reference(x, (90, 101)))
