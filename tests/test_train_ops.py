"""Training-speed formulations (vss.models.ops) against the formulations they replace: equal loss and gradients."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from random_weights import randomize_
from vss.errors import IGNORE_INDEX
from vss.models.aggregators.base import cross_entropy
from vss.models.aggregators.mrcfa import MRCFA
from vss.models.encoders import build_encoder
from vss.models.ops import cross_entropy as ops_ce
from vss.models.ops.cross_entropy import banded_cross_entropy, source_rows
from vss.models.segmenter import Segmenter


def full_map_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, avg_non_ignore: bool) -> torch.Tensor:
    """The formulation before vss.models.ops (mmseg's): the whole map resized, then the pixel cross-entropy."""
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if avg_non_ignore:
        return F.cross_entropy(up, labels, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(up, labels, ignore_index=IGNORE_INDEX, reduction="none").mean()


@pytest.mark.parametrize("host_reads", [True, False], ids=["cpu-softmax", "accelerator-log-softmax"])
@pytest.mark.parametrize("avg_non_ignore", [False, True])
@pytest.mark.parametrize(
    ("shape", "size", "band"),
    [((2, 7, 8, 8), (32, 32), 1 << 18), ((3, 5, 9, 13), (37, 50), 400), ((1, 4, 16, 16), (16, 61), 64)],
)
def test_banded_cross_entropy_equals_the_full_map_loss_and_gradient(
    shape: tuple[int, ...],
    size: tuple[int, int],
    band: int,
    avg_non_ignore: bool,
    host_reads: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sizes that are not multiples (rows reading the last input row twice), bands of one row to the whole map,
    ignored pixels, both means; a non-unit incoming gradient; the CPU formulation and the one without host reads
    (accelerators)."""
    monkeypatch.setattr(ops_ce, "BAND_VALUES", band)
    monkeypatch.setattr(ops_ce, "HOST_READS", host_reads)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    labels = torch.randint(0, shape[1], (shape[0], *size), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.2] = IGNORE_INDEX
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    old = full_map_cross_entropy(a, labels, avg_non_ignore)
    new = banded_cross_entropy(b, labels, IGNORE_INDEX, avg_non_ignore)
    (0.7 * old).backward()
    (0.7 * new).backward()
    torch.testing.assert_close(new, old, rtol=2e-6, atol=0)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("host_reads", [True, False], ids=["cpu-softmax", "accelerator-log-softmax"])
def test_labels_far_below_the_leader_keep_a_finite_exact_loss(
    host_reads: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A labelled class 150 logits under the leader: its softmax underflows (exp(-150) < 1e-45), so the loss takes
    ``u - logsumexp(u)`` there; value and gradient still equal the full-map loss (and no inf or NaN)."""
    monkeypatch.setattr(ops_ce, "HOST_READS", host_reads)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 8, 10, generator=g)
    logits[:, 2, 2:6] += 150.0  # class 2 leads by ~150 in a band of rows
    labels = torch.randint(0, 6, (2, 29, 37), generator=g)
    labels[:, 8:20] = 4  # labelled 4 where 2 leads: p(4) underflows
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    old, new = full_map_cross_entropy(a, labels, False), banded_cross_entropy(b, labels, IGNORE_INDEX)
    old.backward()
    new.backward()
    assert torch.isfinite(new) and new > 30  # the underflowing pixels carry ~150 each
    torch.testing.assert_close(new, old, rtol=2e-6, atol=0)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-9)


def test_source_rows_are_aten_bilinear_rows() -> None:
    """Row interpolation by (y0, y1, weight) equals F.interpolate along the height alone."""
    x = torch.randn(1, 1, 11, 1, generator=torch.Generator().manual_seed(0))  # not the global RNG: other tests seed it
    y0, y1, wy = source_rows(29, 11, x.device)
    rows = x[0, 0, y0, 0] * (1 - wy) + x[0, 0, y1, 0] * wy
    expected = F.interpolate(x, size=(29, 1), mode="bilinear", align_corners=False)[0, 0, :, 0]
    torch.testing.assert_close(rows, expected, rtol=1e-6, atol=1e-6)  # ATen's scale may round one ulp apart


def test_the_loss_uses_the_bands_only_in_training() -> None:
    logits, labels = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 8, 8))
    with torch.no_grad():
        assert cross_entropy(logits, labels).grad_fn is None
    trained = cross_entropy(logits.requires_grad_(True), labels)
    assert type(trained.grad_fn).__name__ == "_BandedCrossEntropyBackward"
    torch.testing.assert_close(trained, full_map_cross_entropy(logits, labels, False), rtol=2e-6, atol=0)


def test_banded_cross_entropy_under_bf16_autocast_returns_a_bf16_gradient() -> None:
    logits = torch.randn(1, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = banded_cross_entropy(logits, torch.randint(0, 3, (1, 8, 8)), IGNORE_INDEX)
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    assert torch.isfinite(logits.grad).all()


# -- the training step of a whole model against its previous formulation -------------------------------------------


def _mrcfa_b0() -> Segmenter:
    torch.manual_seed(0)
    encoder = build_encoder("mit_b0", drop_path_rate=0.0)
    return randomize_(Segmenter(encoder, partial(MRCFA, token_ratio=0.5, dropout=0.0), 7), 1).train()


def _per_frame_select_forward(segmenter: Segmenter, clip: torch.Tensor) -> dict[str, torch.Tensor]:
    """Segmenter.forward before the unbind: each frame's features indexed out of the batch ([:, i])."""
    b, t = clip.shape[:2]
    feats = segmenter.encode(clip.flatten(0, 1))
    per_frame = [{k: v.unflatten(0, (b, t))[:, i] for k, v in feats.items()} for i in range(t)]
    return segmenter.aggregate(per_frame[-1], per_frame[:-1])


def _loss_and_grads(segmenter: Segmenter, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple:
    loss = torch.stack(list(segmenter.losses(outputs, labels).values())).sum()
    segmenter.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in segmenter.named_parameters() if p.grad is not None}


def test_mrcfa_training_step_equals_the_per_frame_select_formulation() -> None:
    """Loss and every parameter's gradient of MRCFA-B0 (2 clips of 4 frames) through Segmenter.forward equal those
    of the per-frame indexing it replaces."""
    segmenter = _mrcfa_b0()
    g = torch.Generator().manual_seed(1)
    clips, labels = torch.randn(2, 4, 3, 64, 64, generator=g), torch.randint(0, 7, (2, 4, 64, 64), generator=g)
    labels[:, :, :5] = IGNORE_INDEX
    new_loss, new = _loss_and_grads(segmenter, segmenter(clips), labels)
    old_loss, old = _loss_and_grads(segmenter, _per_frame_select_forward(segmenter, clips), labels)
    torch.testing.assert_close(new_loss, old_loss, rtol=1e-6, atol=0)
    assert new.keys() == old.keys() and len(new) == len(list(segmenter.parameters()))
    for name, grad in old.items():
        torch.testing.assert_close(new[name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item(), msg=name)
