"""Class ids at full resolution from low-resolution logits without the (B,C,H,W) upsampled map.

``class_map(resize(logits, size))`` (bilinear, align_corners=False, then the first maximum over C) writes and
re-reads all C maps at full resolution: 124 x 480 x 853 floats (203 MB) per VSPW frame, a third of an MRCFA-B1
streaming step on CPU. :func:`upsampled_class_map` gives the same ids block by block:

* an output pixel reads a 2x2 block of input pixels. A class can lead somewhere in a block only if its largest
  logit at the four corners reaches the block's bar, a lower bound of the largest interpolated value there made
  from the corners' leaders, less what the rounding of the interpolation can close (:func:`_rounding`). Blocks
  with one such class take its id without interpolating anything;
* the other blocks' pixels interpolate only their block's candidate classes (the corners gathered once per
  block, blocks grouped by output shape and number of candidates, the blocks innermost in every tensor); where
  the plain float32 values leave a lead smaller than rounding can undo, the kernel's exact values decide (same
  indices and weights, same fused multiply-adds, emulated in float64 with the rounding of a single fma).
  Candidates are kept in ascending class order, so ties keep the first class, as the argmax does.

The emulation is checked against ``F.interpolate`` on this machine once per dtype before it is trusted; where it
does not apply (another device, float64, C <= 3 or a small output, which PyTorch sends to another kernel) or
does not match, the plain resize-then-argmax runs, so the ids are always today's.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PLAIN_BYTES = 32 << 20
"""A frame whose whole upsampled map (C x H x W values) takes at most this goes through resize-then-argmax, one
frame at a time: few classes (the synthetic set's 5: 8 MB at 480x854). The block path pays per undecided pixel,
and a barely trained model leaves nearly every block undecided: with 5 classes of noise at 480x854 it takes 16-18
ms against 8-15 ms for the plain path (the first, banded version took 92 s of CPU over 55 frames in ``vss.eval``
against well under 1 s; experiments/speed.md)."""
CHUNK_VALUES = 1 << 20  # candidate values compared at once: output pixels x their block's candidates (float32)
BUCKETS = [2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
"""Blocks are interpolated in groups of candidate counts (lo, k], padded to k: fewer, larger operations."""
BLOCK_COST = 1.25
"""A candidate interpolated at an output pixel of an undecided block costs about this many values of the classes'
resize-then-argmax (measured on one core, 19 and 124 classes: the two paths break even at 1.1-1.4 of them per
value); where a frame's blocks need more, the classes are resized a few at a time."""
SHAPE_SHARE = 16
"""A block shape (output rows x columns) with at least 1/SHAPE_SHARE of the undecided blocks is interpolated on
its own; rarer shapes (edges) together, padded to the largest."""
LOOP_K = 6
"""Up to this many candidates, the leader and runner-up are kept by a loop over them (whole-tensor maxima over
the blocks); more, by one reduction over the candidates (fewer operations)."""
PAD = -(2.0**120)
"""The corner value of a padding candidate: finite (an infinite one times a zero weight is NaN), and far below
every interpolated logit while the logits' magnitudes stay under LARGEST (else resize-then-argmax runs)."""
LARGEST = 2.0**100
EMULATED = (torch.float32, torch.bfloat16, torch.float16)
_CHECKED: dict[tuple[str, torch.dtype], bool] = {}


def class_map(logits: Tensor) -> Tensor:
    """Class ids (B,H,W) of logits (B,C,H,W): the first maximum over C (``max(1).indices``, as ``argmax(1)``)."""
    return logits.max(1).indices


def _axis(size_in: int, size_out: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PyTorch's CPU source indices and weights of one axis (align_corners=False): i0, i1 (long), l0, l1 (float64).

    ``src = fma(in/out, dst + 0.5, -0.5)`` in float32, clamped at 0; ``l1 = src - floor(src)`` and
    ``l0 = 1 - l1`` stored in the logits' dtype (``compute_source_index_and_lambda``).
    """
    d = torch.arange(size_out, dtype=torch.float64)
    if size_in == size_out:
        i0 = torch.arange(size_out)
        return i0, i0, torch.ones(size_out, dtype=torch.float64), torch.zeros(size_out, dtype=torch.float64)
    scale = torch.tensor(size_in, dtype=torch.float32) / torch.tensor(size_out, dtype=torch.float32)
    src = (scale.double() * (d + 0.5) - 0.5).float().clamp_min(0)  # one rounding: the kernel's fma
    i0 = src.floor().long().clamp_max(size_in - 1)
    i1 = torch.where(i0 < size_in - 1, i0 + 1, i0)
    l1 = (src - i0.float()).clamp(0, 1).to(dtype)
    l0 = (1 - l1.float()).to(dtype)
    return i0, i1, l0.double(), l1.double()


def _fma32(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """float32 ``fma(a, b, c)`` (one rounding of ``a*b + c``) of float32 values held in float64 tensors.

    ``a*b`` is exact in float64; the sum's float64 rounding error comes from TwoSum, and a sum that lands exactly
    between two float32 values is rounded toward the true value, so no double rounding remains.
    """
    p = a * b
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)  # exact: s + err == p + c
    r = s.float()
    rd = r.double()
    toward = torch.where(s > rd, torch.full_like(r, float("inf")), torch.full_like(r, -float("inf")))
    n = torch.nextafter(r, toward)
    tie = (s != rd) & ((s - rd) == (n.double() - s)) & (err != 0)
    fix = tie & ((err > 0) == (n.double() > s))  # the true value lies on n's side of the midpoint
    return torch.where(fix, n, r).double()


def _round32(x: Tensor) -> Tensor:
    """float32 rounding of a float64 tensor (kept in float64)."""
    return x.float().double()


def _interpolate(corners: Sequence[Tensor], wh: Sequence[Tensor], ww: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """The kernel's value from four corners (x00, x01, x10, x11) and weights: ``fma(t0, h0, t1 * h1)`` of rows
    ``t = fma(x0, w0, x1 * w1)`` in float32, then stored in ``dtype``."""
    x00, x01, x10, x11 = corners
    t0 = _fma32(x00, ww[0], _round32(x01 * ww[1]))
    t1 = _fma32(x10, ww[0], _round32(x11 * ww[1]))
    return _fma32(t0, wh[0], _round32(t1 * wh[1])).float().to(dtype)


def _emulated_resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """The whole bilinear resize by the emulation (for the self-check; small inputs only)."""
    (hi0, hi1, hl0, hl1), (wi0, wi1, wl0, wl1) = (
        _axis(x.shape[-2], size[0], x.dtype),
        _axis(x.shape[-1], size[1], x.dtype),
    )
    v = x.double()
    r0, r1 = v[..., hi0, :], v[..., hi1, :]
    corners = (r0[..., wi0], r0[..., wi1], r1[..., wi0], r1[..., wi1])
    return _interpolate(corners, (hl0[:, None], hl1[:, None]), (wl0, wl1), x.dtype)


def emulation_matches(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the emulation gives ``F.interpolate``'s bits on this device and dtype (checked once, cached)."""
    key = (torch.device(device).type, dtype)
    if key not in _CHECKED:
        gen = torch.Generator().manual_seed(0)
        ok = True
        for shape, size in (((2, 5, 13, 17), (101, 131)), ((1, 4, 9, 30), (64, 203)), ((1, 6, 31, 7), (480, 45))):
            x = (torch.randn(shape, generator=gen) * 4).to(device=device, dtype=dtype)
            ref = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            ok &= bool(torch.equal(_emulated_resize(x.cpu(), size), ref.cpu()))
        _CHECKED[key] = ok
    return _CHECKED[key]


def banded_applies(logits: Tensor, size: Sequence[int]) -> bool:
    """Whether :func:`upsampled_class_map` may take its exact block path for these logits (else resize then
    argmax)."""
    return (
        logits.device.type == "cpu"
        and logits.dtype in EMULATED
        and logits.dim() == 4
        and logits.shape[1] > 3  # C <= 3 (one thread) and outputs with H + W <= 128 use PyTorch's channels-last kernel
        and size[0] + size[1] > 128
        and logits.numel() > 0
        and emulation_matches(logits.device, logits.dtype)
    )


@dataclass(frozen=True)
class _Geometry:
    """Where each output pixel reads for a (h,w) -> (H,W) resize: PyTorch's source rows/columns and weights, each
    block's four corners and its output pixels (cached: evaluation resizes every frame of a video to one size)."""

    wh: tuple[Tensor, Tensor, Tensor, Tensor]  # i0, i1 (long), l0, l1 (float64) of the H output rows
    ww: tuple[Tensor, Tensor, Tensor, Tensor]  # the same for the W output columns
    lh: tuple[Tensor, Tensor]  # l0, l1 of the rows in float32
    lw: tuple[Tensor, Tensor]  # and of the columns
    nxt_h: Tensor  # (h,) the second row of the block starting at each row
    nxt_w: Tensor  # (w,)
    corners: Tensor  # (4, h*w) flat input positions of block (i, j)'s corners: (i,j), (i,j'), (i',j), (i',j')
    block: Tensor  # (H*W,) the block (i0 * w + j0) of each output pixel
    first_row: Tensor  # (h,) the first output row whose block starts at row i (its rows are consecutive)
    rows: Tensor  # (h,) how many output rows it has (0: none)
    first_col: Tensor  # (w,)
    cols: Tensor  # (w,)


def _partner(i0: Tensor, i1: Tensor, n: int) -> Tensor:
    """``i1`` as a function of ``i0`` over the n input positions: the second row (column) of each block."""
    nxt = torch.arange(n)
    nxt[i0] = i1
    return nxt


def _spans(i0: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """First output position and number of positions of each of the n input positions (``i0`` is ascending)."""
    count = torch.bincount(i0, minlength=n)
    return count.cumsum(0) - count, count


@functools.lru_cache(maxsize=8)
def _geometry(h: int, w: int, out_h: int, out_w: int, dtype: torch.dtype) -> _Geometry:
    wh, ww = _axis(h, out_h, dtype), _axis(w, out_w, dtype)
    nxt_h, nxt_w = _partner(wh[0], wh[1], h), _partner(ww[0], ww[1], w)
    rows, cols = torch.arange(h)[:, None] * w, torch.arange(w)[None]
    corners = torch.stack([(r + c).flatten() for r in (rows, nxt_h[:, None] * w) for c in (cols, nxt_w[None])])
    block = (wh[0][:, None] * w + ww[0][None]).flatten()
    lh, lw = (wh[2].float(), wh[3].float()), (ww[2].float(), ww[3].float())
    return _Geometry(wh, ww, lh, lw, nxt_h, nxt_w, corners, block, *_spans(wh[0], h), *_spans(ww[0], w))


def _pair_max(t: Tensor, dim: int, nxt: Tensor) -> Tensor:
    """``maximum(t, t[nxt])`` along dim: the larger of each position and its block partner."""
    n = t.shape[dim]
    if n > 1 and torch.equal(nxt, torch.arange(1, n + 1).clamp_max(n - 1)):  # the next one, the edge repeated
        out = torch.empty_like(t)
        torch.maximum(t.narrow(dim, 0, n - 1), t.narrow(dim, 1, n - 1), out=out.narrow(dim, 0, n - 1))
        out.narrow(dim, n - 1, 1).copy_(t.narrow(dim, n - 1, 1))
        return out
    return torch.maximum(t, t.index_select(dim, nxt))


def _rounding(dtype: torch.dtype) -> float:
    """Twice what rounding can move two compared values apart, per unit of the frame's largest |logit| M: each
    float32 interpolation (the kernel's, or the plain one here) is within ``6 u M`` of the exact bilinear value
    (``u`` the float32 unit roundoff: ``3 eps32 M``), so two differ by at most ``6 eps32 M`` from their exact
    difference, and storing the kernel's result in ``dtype`` can tie values ``eps(dtype) M`` apart."""
    return 2 * (torch.finfo(dtype).eps + 6 * torch.finfo(torch.float32).eps)


def _candidates(x: Tensor, g: _Geometry) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None:
    """Per block (B*h*w,): how many classes can lead an output pixel in it, where its candidates start, the one
    that surely can; each frame's largest |logit| (B,); and the candidate classes of all blocks, block after
    block, ascending. ``x`` is (B,C,h,w), contiguous; None where the logits are not all finite.

    The bar of a block is a lower bound of the largest interpolated value anywhere in the block: the larger of
    (a) the best, over the leaders of its four corners, of that class's smallest logit at the corners (bilinear
    weights are >= 0 and each rounded step is monotone) and (b) the smallest over the corners of the leaders'
    mean logit (the mean of four classes' values never exceeds the largest; this one holds at class borders, where
    each leader is low at the other's corners), less what rounding can take (:func:`_rounding`, which also covers
    the float32 mean of (b)). A class whose largest corner logit is
    below the bar cannot lead. The argmax class of any point reaches the bar, so every block has a candidate.
    """
    b, c, h, w = x.shape
    hw = h * w
    flat = x.view(b, c * hw)
    big = torch.maximum(flat.amax(1).abs(), flat.amin(1).abs())  # (B,): each frame's largest |logit|
    if not bool(torch.isfinite(big).all()) or float(big.max()) >= LARGEST:
        return None  # NaN/inf: the kernel's propagation decides, not bounds; or values near PAD
    top = x.max(1)  # (B,h,w): each input pixel's leader and its logit
    leaders = top.indices.view(b, 1, hw).index_select(2, g.corners.view(-1))  # (B,1,4a*hw): corners' leaders
    at = g.corners.view(1, 4, 1, hw) + leaders.view(b, 1, 4, hw) * hw  # (B,4q,4a,hw): a's logit at corner q
    at_corners = flat.gather(1, at.view(b, -1)).view(b, 4, 4, hw)
    bars = torch.maximum(at_corners.amin(1).amax(1), at_corners.mean(2).amin(1))  # (B,h*w)
    bar = bars.view(b, 1, h, w) - _rounding(x.dtype) * big.view(b, 1, 1, 1) - 1e-30
    highs = _pair_max(_pair_max(x, 2, g.nxt_h), 3, g.nxt_w)  # (B,C,h,w): each class's largest corner logit
    at = (highs >= bar).view(-1).nonzero()[:, 0]  # class-major: (n, class, block)
    n, at = at // (c * hw), at % (c * hw)
    found = ((n * hw + at % hw) * c + at // hw).sort().values  # block-major, classes ascending
    count = torch.bincount(found // c, minlength=b * h * w)  # >= 1 (see above)
    classes = found % c
    first = count.cumsum(0) - count  # where each block's candidates start in ``classes``
    sure = torch.where(count == 1, classes.index_select(0, first.clamp_max(len(found) - 1)), -1)
    return count, first, sure, big, classes


@torch.no_grad()
def upsampled_class_map(logits: Tensor, size: Sequence[int], chunk: int = CHUNK_VALUES) -> Tensor:
    """``class_map(resize(logits, size))`` (bilinear, align_corners=False, first maximum), bit for bit, without
    the (B,C,H,W) upsampled map: blocks with one possible leader take its id, the other blocks' pixels compare only
    their block's candidate classes, about ``chunk`` values at a time (see the module docstring)."""
    size = (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) == size:
        return class_map(logits)
    if logits.dim() == 4 and logits.shape[1] * size[0] * size[1] * logits.element_size() <= PLAIN_BYTES:
        return torch.cat(
            [
                class_map(F.interpolate(f.contiguous(), size=size, mode="bilinear", align_corners=False))
                for f in logits.split(1)
            ]
        )
    found = None
    if banded_applies(logits, size):
        g = _geometry(*logits.shape[-2:], *size, logits.dtype)
        x = logits.contiguous()
        found = _candidates(x, g)
    if found is None:
        return class_map(F.interpolate(logits.contiguous(), size=size, mode="bilinear", align_corners=False))
    count, first, sure, big, classes = found
    b, c, h, w = x.shape
    todo = (count > 1).nonzero()[:, 0]
    pos = todo % (h * w)
    nr, nc = g.rows.index_select(0, pos // w), g.cols.index_select(0, pos % w)
    todo, nr, nc = (t[nr * nc > 0] for t in (todo, nr, nc))  # blocks no output pixel reads (downscaling)
    need = count.index_select(0, todo)
    used = torch.zeros(c, dtype=torch.bool).index_fill_(0, classes, True).nonzero()[:, 0]
    if int((need * nr * nc).sum()) * BLOCK_COST > len(used) * b * size[0] * size[1]:
        return _by_classes(logits, used, size, chunk)  # flat logits (noise): most pixels have many candidates
    out = sure.view(b, h * w).index_select(1, g.block)  # (B,H*W): -1 where the block has several candidates
    margin = _rounding(x.dtype) * big  # (B,): what rounding can undo of a lead in each frame
    near: list[tuple[Tensor, ...]] = []
    for shape, blocks, nblk in _by_shape(todo, nr, nc, need):
        present = torch.bincount(nblk).nonzero()[:, 0].tolist()  # the candidate counts of these blocks
        bounds = [1, *(k for k in BUCKETS if k < present[-1]), present[-1]]
        for lo, k in itertools.pairwise(bounds):  # blocks with (lo, k] candidates, padded to k
            if any(lo < n <= k for n in present):
                sel = blocks.index_select(0, ((nblk > lo) & (nblk <= k)).nonzero()[:, 0])
                step = max(1, chunk // (k * shape[0] * shape[1]))
                for s0 in range(0, len(sel), step):
                    found = _fill(
                        out.view(-1), x, g, size, sel[s0 : s0 + step], k, shape, count, classes, first, margin
                    )
                    near += [found] if found is not None else []
    if near:
        _decide_near(out.view(-1), g, x.dtype, near)
    return out.view(b, *size)


def _by_classes(logits: Tensor, used: Tensor, size: tuple[int, int], chunk: int) -> Tensor:
    """Resize-then-argmax over the classes ``used`` (ascending; every other class leads nowhere), a few classes'
    full-resolution maps at a time, keeping the running first maximum: the kernel's own values (a channel's
    interpolation does not depend on the others), with a working set of about ``chunk`` values."""
    b = logits.shape[0]
    step = max(4, chunk // (b * size[0] * size[1]))  # C <= 3 would take PyTorch's other kernel
    best = ids = None
    for s0 in range(0, len(used), step):
        sub = used[s0 : s0 + step]
        if len(sub) < 4:  # repeat the chunk's first class after it: a repeat never beats its first occurrence
            sub = torch.cat([sub, sub[:1].expand(4 - len(sub))])
        top = F.interpolate(logits.index_select(1, sub), size=size, mode="bilinear", align_corners=False).max(1)
        found = sub.index_select(0, top.indices.view(-1)).view_as(top.indices)
        if best is None:
            best, ids = top.values, found
        else:
            ahead = top.values > best  # strictly: on ties the earlier class stays
            best, ids = torch.where(ahead, top.values, best), torch.where(ahead, found, ids)
    return ids


def _by_shape(todo: Tensor, nr: Tensor, nc: Tensor, need: Tensor) -> list[tuple[tuple[int, int], Tensor, Tensor]]:
    """The blocks ``todo`` grouped by their output shape (rows x columns): each shape that holds at least
    1/SHAPE_SHARE of them, and the others together, padded to their largest rows and columns. Returns (shape,
    blocks, their candidate counts) per group."""
    key = nr * (int(nc.max()) + 1) + nc if len(todo) else nr
    shapes, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    common = counts * SHAPE_SHARE >= len(todo)
    groups = []
    for s in common.nonzero()[:, 0].tolist() + ([-1] if not bool(common.all()) else []):
        at = (inverse == s if s >= 0 else ~common.index_select(0, inverse)).nonzero()[:, 0]
        r, cc = int(nr.index_select(0, at).max()), int(nc.index_select(0, at).max())
        groups.append(((r, cc), todo.index_select(0, at), need.index_select(0, at)))
    return groups


def _fill(
    out: Tensor,
    x: Tensor,
    g: _Geometry,
    size: tuple[int, int],
    blocks: Tensor,
    k: int,
    shape: tuple[int, int],
    count: Tensor,
    classes: Tensor,
    first: Tensor,
    margin: Tensor,
) -> tuple[Tensor, ...] | None:
    """The class ids of the output pixels of ``blocks`` (flat over the batch, each with at most k candidate
    classes and at most ``shape`` output rows x columns), written into ``out`` (B*H*W,): each block's candidates
    interpolated at its pixels, rows then columns as the kernel does, in one (k, rows, columns, blocks) tensor.
    Blocks with fewer candidates repeat their last one with PAD at its corners; smaller blocks repeat their last
    row and column (the same pixel computed twice, the same id written twice). Pixels whose leader is within
    rounding of the next are returned for :func:`_decide_near` (their corner values, padding, classes, row,
    column and place in ``out``), None if there are none."""
    b, c, h, w = x.shape
    hw, nb, (rows, cols) = h * w, len(blocks), shape
    have = count.index_select(0, blocks)
    slots = torch.arange(k)[:, None]
    pad = slots >= have  # (k,nb) padding slots; every tensor below has the blocks innermost
    cls = classes.index_select(0, (first.index_select(0, blocks) + torch.minimum(slots, have - 1)).view(-1))
    cls = cls.view(k, nb)
    n = blocks // hw
    pos = blocks - n * hw
    i = pos // w
    j = pos - i * w
    at = n * (c * hw) + g.corners.index_select(1, pos)  # (4,nb): each corner's logit of class 0
    values = x.view(-1).index_select(0, (at[:, None] + cls * hw).view(-1)).float().view(4, k, nb)
    values.masked_fill_(pad, PAD)  # below every real value once interpolated (|logits| < LARGEST)
    last_row, last_col = g.rows.index_select(0, i) - 1, g.cols.index_select(0, j) - 1
    row = g.first_row.index_select(0, i) + torch.minimum(torch.arange(rows)[:, None], last_row)  # (rows,nb)
    col = g.first_col.index_select(0, j) + torch.minimum(torch.arange(cols)[:, None], last_col)  # (cols,nb)
    h0, h1 = (t.index_select(0, row.view(-1)).view(rows, 1, nb) for t in g.lh)
    w0, w1 = (t.index_select(0, col.view(-1)).view(cols, nb) for t in g.lw)
    x00, x01, x10, x11 = values[:, :, None]  # (k,1,nb) each
    t0 = (x00 * w0).addcmul_(x01, w1)[:, None]  # (k,1,cols,nb): the block's first row, then its second
    t1 = (x10 * w0).addcmul_(x11, w1)[:, None]
    vals = (t0 * h0).addcmul_(t1, h1)  # (k,rows,cols,nb)
    if k > LOOP_K:  # one reduction over the candidates
        top, best = vals.max(0)
        second = vals.scatter_(0, best[None], -float("inf")).amax(0)
    else:  # a running first maximum and runner-up, one candidate at a time (k >= 2)
        top, second = torch.maximum(vals[0], vals[1]), torch.minimum(vals[0], vals[1])
        best = (vals[1] > vals[0]).long()
        low, ahead = torch.empty_like(top), torch.empty_like(top, dtype=torch.bool)
        for s in range(2, k):
            v = vals[s]
            torch.maximum(second, torch.minimum(top, v, out=low), out=second)
            best.masked_fill_(torch.gt(v, top, out=ahead), s)
            torch.maximum(top, v, out=top)
    best = best.view(-1).masked_fill_(
        torch.sub(top, second, out=second).view(-1) <= margin.index_select(0, n).repeat(rows * cols), -1
    )
    target = (n * size[0] + row[:, None]) * size[1] + col  # (rows,cols,nb)
    out.scatter_(0, target.view(-1), cls.gather(0, best.clamp(min=0).view(rows * cols, nb)).view(-1))
    near = (best < 0).nonzero()[:, 0]  # near ties: the kernel's exact bits decide
    if not len(near):
        return None
    blk, rc = near % nb, near // nb
    rn, cn = row.view(-1).index_select(0, rc // cols * nb + blk), col.view(-1).index_select(0, rc % cols * nb + blk)
    return (
        values.index_select(2, blk).permute(2, 0, 1),
        pad.index_select(1, blk).t(),
        cls.index_select(1, blk).t(),
        rn,
        cn,
        target.view(-1).index_select(0, near),
    )


def _decide_near(out: Tensor, g: _Geometry, dtype: torch.dtype, near: list[tuple[Tensor, ...]]) -> None:
    """The ids of the near-tie pixels that :func:`_fill` returned, by the kernel's exact values (same indices and
    weights, its fused multiply-adds emulated in float64): all pixels with the same number of candidates at once."""
    by_k: dict[int, list[tuple[Tensor, ...]]] = {}
    for found in near:
        by_k.setdefault(found[0].shape[-1], []).append(found)
    for group in by_k.values():
        _decide_exactly(out, g, dtype, *(torch.cat(t) for t in zip(*group, strict=True)))


def _decide_exactly(
    out: Tensor,
    g: _Geometry,
    dtype: torch.dtype,
    values: Tensor,
    pad: Tensor,
    cls: Tensor,
    rn: Tensor,
    cn: Tensor,
    target: Tensor,
) -> None:
    """Write the first maximum of the kernel's exact values of candidates ``cls`` (P,k) from their corner values
    (P,4,k) at output rows ``rn`` and columns ``cn`` into ``out`` at ``target``; ``pad`` slots left out."""
    exact = _interpolate(
        values.double().unbind(1),
        [t.index_select(0, rn)[:, None] for t in g.wh[2:]],
        [t.index_select(0, cn)[:, None] for t in g.ww[2:]],
        dtype,
    )
    best = exact.masked_fill_(pad, -float("inf")).max(1).indices
    out.scatter_(0, target, cls.gather(1, best[:, None])[:, 0])
