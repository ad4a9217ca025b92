"""STF + MAR (Zhuang et al., TCSVT; arXiv 2301.03832), as the official code (jfzhuang/ST_Memory) computes it.

Base network: mmseg PSPNet R50-D8 (``encoder=resnet50c``, :class:`vss.models.heads.PSPHead`). Per frame
(:meth:`STFMAR.encode`, cacheable): the PSP bottleneck feature (512 x H/8 x W/8). Temporal
(:meth:`STFMAR.aggregate`): the frames t-1, t, t+1 (``offsets``, stacked in time order) go through the
Spatial-Temporal Fusion transformer (:class:`SpatialTemporalFusion`: one post-norm encoder layer over the
frames, one decoder layer with the raw target feature as query; every attention is a 3-D interlaced sparse
attention, :class:`InterlacedSparseAttention`); with ``mar=true`` the Memory-Augmented Refinement
(:class:`MemoryAugmentedRefinement`) lets each pixel attend over a static class memory; the PSP classifier
``decode_head.conv_seg`` (official ``cls_seg``) gives the logits at 1/8.

Stages are config, not code (../shared/reference/stf-mar-official.md A.2-A.7):

1. ``model=stf`` (``mar=false``): init_from a PSPNet run/checkpoint, ``freeze=[encoder,
   aggregator.decode_head.psp_modules, aggregator.decode_head.bottleneck]``, ``init_exclude=
   [aggregator.decode_head.conv_seg]`` (the official code re-initialises the classifier at each stage).
2. The memory pass: a stage-1 model's ``aggregate`` returns ``features`` (the STF output) beside ``logits``
   at inference too; the pass keeps, per class, the K lowest-score correct pixels as keys and the mean of
   the K highest-score ones as the prototype, and writes them with :func:`save_memory`.
3. ``model=stf_mar`` (``mar=true``) ``model.memory=memory.pt``: init_from stage 1, freeze also
   ``aggregator.stf``; MAR, its memory and ``conv_seg`` train.

Readings where the notes are silent: the positional tables are resized with ``align_corners=False`` (the
``F.interpolate`` default; at the official 1024x2048 input the resize is the identity and is skipped);
the short-range step of the decoder's cross-attention adds the target's ``query_pos``; a target predicted
alone (``aggregate(target, [])``) runs STF with T=1 and the target's own slice of ``pe_enc``; MAR has no
dropout on its attention weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vss.errors import ConfigError
from vss.models.aggregators.base import Aggregator, FrameFeatures
from vss.models.heads import PSPHead

if TYPE_CHECKING:
    from vss.checkpoint import ImportResult

__all__ = [
    "STFMAR",
    "InterlacedSparseAttention",
    "MemoryAugmentedRefinement",
    "MemorySampler",
    "build_memory",
    "collect_memory",
    "SpatialTemporalFusion",
    "check_input_size",
    "check_train_config",
    "import_official_checkpoint",
    "load_memory",
    "load_official_memory",
    "official_names",
    "save_memory",
]

OUTPUT_STRIDE = 8
"""The PSPNet R50-D8 feature's stride: STF's block grid is counted on it."""
OFFICIAL_BLOCK = (16, 16)
"""The official ISA block (``block_size: auto`` takes it wherever the feature map divides by it)."""


# -- checks ------------------------------------------------------------------------------------------------
def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.{key}={value!r} is invalid: expected a positive integer")
    return value


def _pair(key: str, value: Any) -> tuple[int, int]:
    try:
        pair = tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ConfigError(f"model.{key}={value!r} is invalid: expected [height, width], two positive integers")
    return int(pair[0]), int(pair[1])


def block_size_value(value: Any) -> tuple[int, int] | None:
    """``model.block_size``: ``auto`` (None) or [height, width]."""
    return None if value == "auto" else _pair("block_size", value)


def auto_block(h: int, w: int) -> tuple[int, int]:
    """``block_size: auto`` on an h x w feature map: per side the official 16, else its largest divisor below 16
    (at the official sizes, multiples of 128, always 16x16)."""

    def side(block: int, n: int) -> int:
        return max(d for d in range(1, min(block, n) + 1) if n % d == 0)

    return side(OFFICIAL_BLOCK[0], h), side(OFFICIAL_BLOCK[1], w)


def check_input_size(
    height: int, width: int, reduction: int = OUTPUT_STRIDE, block_size: Sequence[int] = (16, 16), key: str = "input"
) -> None:
    """Raise ConfigError unless an input of ``height`` x ``width`` gives a feature map (stride ``reduction``)
    whose sides are multiples of STF's ``block_size``: multiples of 128 for 16x16 blocks at stride 8."""
    bh, bw = (int(b) for b in block_size)
    mh, mw = bh * reduction, bw * reduction
    if height % mh or width % mw:
        raise ConfigError(
            f"{key}={[height, width]} is invalid for STF: the input must be a multiple of {mh}x{mw} "
            f"(model.block_size={[bh, bw]} blocks on the stride-{reduction} feature map)"
        )


def check_train_config(cfg: Any) -> None:
    """Config-time check of a training config for STF/MAR: the crop (``data.crop_size``, padded to it) and the
    evaluation sizes (``data.size_divisor``, sides rounded up to a multiple of it) must be multiples of
    ``block_size`` x 8 (128 for the official 16x16 blocks). A hook shared code can call with the composed
    config (``cfg.model`` of this module); a missing key is not checked. ``block_size: auto`` fits any size.
    Warns when MAR would train from a random memory (``model.mar`` without ``model.memory`` or ``init_from``)."""
    from omegaconf import OmegaConf

    memory, init_from = (OmegaConf.select(cfg, k, default=None) for k in ("model.memory", "init_from"))
    if OmegaConf.select(cfg, "model.mar", default=False) is True and memory is None and not init_from:
        warnings.warn(
            "model.mar=true without model.memory: MAR's memory is random; build it with the memory pass over a "
            "trained model=stf and pass model.memory=memory.pt (or init_from= a checkpoint that holds it)",
            stacklevel=2,
        )
    block = block_size_value(OmegaConf.select(cfg, "model.block_size", default=list(OFFICIAL_BLOCK)))
    if block is None:
        return
    crop = OmegaConf.select(cfg, "data.crop_size", default=None)
    if crop is not None:
        check_input_size(int(crop[0]), int(crop[1]), OUTPUT_STRIDE, block, key="data.crop_size")
    divisor = OmegaConf.select(cfg, "data.size_divisor", default=None)
    if divisor is not None:
        m = [b * OUTPUT_STRIDE for b in block]
        if any(int(divisor) % v for v in m):
            raise ConfigError(
                f"data.size_divisor={divisor} is invalid for STF: evaluation frames must be multiples of {m[0]}x{m[1]} "
                f"(model.block_size={list(block)} at stride {OUTPUT_STRIDE}); set data.size_divisor={max(m)}"
            )


# -- STF: 3-D interlaced sparse attention ------------------------------------------------------------------
def _long_groups(x: Tensor, block: tuple[int, int]) -> Tensor:
    """(B,T,H,W,C) -> (B*ph*pw, T*nh*nw, C): one sequence per in-block offset (a,b), over the stride-block
    lattice {(tau, ph*i+a, pw*j+b)} of all T frames (the long-range groups of ISA)."""
    b, t, h, w, c = x.shape
    ph, pw = block
    return x.reshape(b, t, h // ph, ph, w // pw, pw, c).permute(0, 3, 5, 1, 2, 4, 6).reshape(b * ph * pw, -1, c)


def _short_groups(x: Tensor, block: tuple[int, int]) -> Tensor:
    """(B,T,H,W,C) -> (B*nh*nw, T*ph*pw, C): one sequence per block window, over its pixels in all T frames."""
    b, t, h, w, c = x.shape
    ph, pw = block
    return x.reshape(b, t, h // ph, ph, w // pw, pw, c).permute(0, 2, 4, 1, 3, 5, 6).reshape(-1, t * ph * pw, c)


def _long_to_short(y: Tensor, shape: Sequence[int], block: tuple[int, int]) -> Tensor:
    """The long-range layout of a (B,T,H,W,C) map -> its short-range layout (one permute)."""
    b, t, h, w, c = shape
    ph, pw = block
    nh, nw = h // ph, w // pw
    return y.reshape(b, ph, pw, t, nh, nw, c).permute(0, 4, 5, 3, 1, 2, 6).reshape(b * nh * nw, t * ph * pw, c)


def _from_short(y: Tensor, shape: Sequence[int], block: tuple[int, int]) -> Tensor:
    """The short-range layout -> (B,T,H,W,C)."""
    b, t, h, w, c = shape
    ph, pw = block
    nh, nw = h // ph, w // pw
    return y.reshape(b, nh, nw, t, ph, pw, c).permute(0, 3, 1, 4, 2, 5, 6).reshape(b, t, h, w, c)


class InterlacedSparseAttention(nn.Module):
    """3-D interlaced sparse attention (official ``ISA_Block`` / ``ISA_Block_CA``).

    Long-range step: one multi-head attention per in-block offset over the stride-``block_size`` lattice
    across the frames (queries of the Tq query frames against keys/values of the Tk key frames); short-range
    step: a second attention over the long step's output within each block window across the Tq frames.
    Queries and keys get their positional encoding added (in both steps), values do not.
    """

    def __init__(self, dim: int, num_heads: int, block_size: tuple[int, int] | None, dropout: float) -> None:
        super().__init__()
        self.block_size = block_size
        self.long_range = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.short_range = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        query_pos: Tensor,
        key_pos: Tensor,
        block: tuple[int, int] | None = None,
    ) -> Tensor:
        """query (B,Tq,H,W,C), key/value (B,Tk,H,W,C), positions broadcastable to them -> (B,Tq,H,W,C);
        ``block`` overrides ``block_size`` (``block_size: auto``)."""
        blk = block or self.block_size
        shape = query.shape
        q = _long_groups(query + query_pos, blk)
        k = _long_groups(key + key_pos, blk)
        y = self.long_range(q, k, _long_groups(value, blk), need_weights=False)[0]
        y = _long_to_short(y, shape, blk)
        qk = y + _short_groups(query_pos.expand(shape), blk)
        return _from_short(self.short_range(qk, qk, y, need_weights=False)[0], shape, blk)


def _ffn(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """W2 drop(ReLU(W1 x)) (indices 0 and 3 hold the weights)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, dim))


class STFEncoderLayer(nn.Module):
    """Post-norm encoder layer: x = LN(x + drop(ISA(x, x, x, pos))); x = LN(x + drop(FFN(x)))."""

    def __init__(
        self, dim: int, num_heads: int, mlp_dim: int, block_size: tuple[int, int] | None, dropout: float
    ) -> None:
        super().__init__()
        self.attn = InterlacedSparseAttention(dim, num_heads, block_size, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = _ffn(dim, mlp_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor, block: tuple[int, int] | None = None) -> Tensor:
        """(B,T,H,W,C) -> (B,T,H,W,C)."""
        x = self.norm1(x + self.dropout(self.attn(x, x, x, pos, pos, block)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class STFDecoderLayer(nn.Module):
    """Post-norm decoder layer: ISA self-attention on the target (``query_pos``), cross-attention ISA (target
    queries vs the encoder memory), FFN; each with add & LayerNorm."""

    def __init__(
        self, dim: int, num_heads: int, mlp_dim: int, block_size: tuple[int, int] | None, dropout: float
    ) -> None:
        super().__init__()
        self.self_attn = InterlacedSparseAttention(dim, num_heads, block_size, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = InterlacedSparseAttention(dim, num_heads, block_size, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = _ffn(dim, mlp_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, tgt: Tensor, memory: Tensor, query_pos: Tensor, pos: Tensor, block: tuple[int, int] | None = None
    ) -> Tensor:
        """tgt (B,1,H,W,C), memory (B,T,H,W,C) -> (B,1,H,W,C)."""
        tgt = self.norm1(tgt + self.dropout(self.self_attn(tgt, tgt, tgt, query_pos, query_pos, block)))
        tgt = self.norm2(tgt + self.dropout(self.cross_attn(tgt, memory, memory, query_pos, pos, block)))
        return self.norm3(tgt + self.dropout(self.ffn(tgt)))


def resize_table(table: Tensor, size: Sequence[int]) -> Tensor:
    """A learned positional table (1,C,T0,h0,w0) resized trilinearly to ``size`` = (T,h,w); the table itself
    when it already has that size (a same-size linear resize samples the grid exactly: skipping it is exact)."""
    if tuple(table.shape[2:]) == tuple(size):
        return table
    return F.interpolate(table, size=tuple(size), mode="trilinear", align_corners=False)


class SpatialTemporalFusion(nn.Module):
    """STF (official ``lib/net/transformer.py: STF``): a DETR-style post-norm encoder-decoder, ``depth`` layers
    each, over the frames' features with the raw target feature as decoder query; learned positional tables
    ``pe_enc`` (1,C,T,pe_h,pe_w) and ``pe_dec`` (1,C,1,pe_h,pe_w), resized to the input each call."""

    def __init__(
        self,
        dim: int = 512,
        num_frames: int = 3,
        depth: int = 1,
        num_heads: int = 2,
        mlp_dim: int = 256,
        block_size: Sequence[int] | str = (16, 16),
        pe_size: Sequence[int] = (128, 256),
        dropout: float = 0.1,
        target_index: int = 1,
    ) -> None:
        super().__init__()
        self.block_size = block_size_value(block_size)  # None: auto
        self.target_index = int(target_index)
        pe_h, pe_w = _pair("pe_size", pe_size)
        self.pe_enc = nn.Parameter(torch.empty(1, dim, num_frames, pe_h, pe_w))
        self.pe_dec = nn.Parameter(torch.empty(1, dim, 1, pe_h, pe_w))
        args = (dim, num_heads, mlp_dim, self.block_size, dropout)
        self.encoder_layers = nn.ModuleList(STFEncoderLayer(*args) for _ in range(depth))
        self.decoder_layers = nn.ModuleList(STFDecoderLayer(*args) for _ in range(depth))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official ``weight_init``: xavier-uniform on every parameter with more than one dimension (the
        positional tables included: they start near zero, bound ~3e-4 at full size), the rest as built."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def block_for(self, h: int, w: int) -> tuple[int, int]:
        """The ISA block on an h x w feature map: ``block_size``, checked, or :func:`auto_block`."""
        if self.block_size is None:
            return auto_block(h, w)
        ph, pw = self.block_size
        if h % ph or w % pw:
            raise ConfigError(
                f"STF's feature map {h}x{w} is not divisible by model.block_size={[ph, pw]}: the input must be a "
                f"multiple of {ph * OUTPUT_STRIDE}x{pw * OUTPUT_STRIDE} (data.crop_size, data.size_divisor), or "
                "model.block_size=auto"
            )
        return ph, pw

    def positions(self, t: int, h: int, w: int) -> tuple[Tensor, Tensor]:
        """The encoder's and the decoder's positional encodings, channel-last (1,T,h,w,C) and (1,1,h,w,C). T=1
        with a table of more frames (a target alone) takes the target's slice of ``pe_enc``."""
        table = self.pe_enc
        if t == 1 and table.shape[2] != 1:
            table = table[:, :, self.target_index : self.target_index + 1]
        elif t != table.shape[2]:
            raise ConfigError(f"STF was built for {table.shape[2]} frames (pe_enc), got {t}")
        pos = resize_table(table, (t, h, w)).permute(0, 2, 3, 4, 1)
        query_pos = resize_table(self.pe_dec, (1, h, w)).permute(0, 2, 3, 4, 1)
        return pos, query_pos

    def forward(self, frames: Tensor, target_index: int) -> Tensor:
        """frames (B,T,C,H,W) in time order, the target at ``target_index`` -> the fused target feature (B,C,H,W)."""
        b, t, c, h, w = frames.shape
        block = self.block_for(h, w)
        pos, query_pos = self.positions(t, h, w)
        x = frames.permute(0, 1, 3, 4, 2)  # B,T,H,W,C
        tgt = x[:, target_index : target_index + 1]
        memory = x
        for layer in self.encoder_layers:
            memory = layer(memory, pos, block)
        for layer in self.decoder_layers:
            tgt = layer(tgt, memory, query_pos, pos, block)
        return tgt[:, 0].permute(0, 3, 1, 2)


# -- MAR ---------------------------------------------------------------------------------------------------
def _projection(dim: int, mlp_dim: int) -> nn.Sequential:
    """Official ``to_q`` / ``to_k`` / ``to_v``: Linear(C,C), Linear(C,mlp), Linear(mlp,mlp); no bias, no activation."""
    return nn.Sequential(
        nn.Linear(dim, dim, bias=False), nn.Linear(dim, mlp_dim, bias=False), nn.Linear(mlp_dim, mlp_dim, bias=False)
    )


def _linear_stack(stack: nn.Sequential, x: Tensor) -> Tensor:
    """``stack(x)`` for a stack of bias-free Linear layers, as functions: the memory (a Parameter) as a module's
    input breaks torch's module tracker (FlopCounterMode, ``vss.bench``) under inference mode."""
    for layer in stack:
        x = F.linear(x, layer.weight, layer.bias)
    return x


class MemoryAugmentedRefinement(nn.Module):
    """MAR (official ``MAR`` / ``TransformerHELayer``): each pixel attends over a static class memory.

    ``memory_key`` and ``memory_value`` (num_classes*K, C) are class-major: slot r belongs to class r // K;
    the keys are the K hard (low-score, correct) features of each class, value slot r the prototype of class
    r // K. Read path: attn = softmax(q k^T) (single head, no 1/sqrt(d) scaling); x = LN(x + drop(W_o attn v));
    x = LN(x + drop(FFN(x))).
    """

    def __init__(
        self, dim: int, num_classes: int, keys_per_class: int = 10, mlp_dim: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.num_classes, self.keys_per_class = int(num_classes), int(keys_per_class)
        slots = self.num_classes * self.keys_per_class
        self.memory_key = nn.Parameter(torch.randn(slots, dim))
        self.memory_value = nn.Parameter(torch.randn(num_classes, dim).repeat_interleave(keys_per_class, 0))
        self.to_q = _projection(dim, mlp_dim)
        self.to_k = _projection(dim, mlp_dim)
        self.to_v = _projection(dim, mlp_dim)
        self.proj = nn.Linear(mlp_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = _ffn(dim, mlp_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    @torch.no_grad()
    def set_memory(self, memory: dict[str, Tensor], source: str = "memory") -> None:
        """Load a memory dict (:func:`load_memory`): keys as they are, prototypes repeat-interleaved K times."""
        key, prototype = memory["key"], memory["prototype"]
        expected_key, expected_proto = tuple(self.memory_key.shape), (self.num_classes, self.memory_key.shape[1])
        if tuple(key.shape) != expected_key or tuple(prototype.shape) != expected_proto:
            raise ConfigError(
                f"model.memory={source}: key {tuple(key.shape)} and prototype {tuple(prototype.shape)} do not match "
                f"the model's key {expected_key} and prototype {expected_proto} (data.num_classes x "
                "model.keys_per_class, model.channels)"
            )
        self.memory_key.copy_(key)
        self.memory_value.copy_(prototype.repeat_interleave(self.keys_per_class, 0))

    def forward(self, x: Tensor) -> Tensor:
        """(B,C,H,W) -> the refined feature (B,C,H,W)."""
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # B,HW,C
        q = self.to_q(tokens)
        k = _linear_stack(self.to_k, self.memory_key)
        v = _linear_stack(self.to_v, self.memory_value)
        attn = torch.softmax(q @ k.t(), dim=-1)  # unscaled, as the official code
        out = self.norm1(tokens + self.dropout(self.proj(attn @ v)))
        out = self.norm2(out + self.dropout(self.ffn(out)))
        return out.transpose(1, 2).reshape(b, c, h, w)


# -- memory files ------------------------------------------------------------------------------------------
def save_memory(path: str | Path, key: Tensor, prototype: Tensor, count: Tensor) -> None:
    """Write a MAR memory: ``key`` (num_classes*K, C), class-major; ``prototype`` (num_classes, C); ``count``
    (num_classes,) the correct pixels seen per class (-1: unknown). Read back by :func:`load_memory`."""
    from vss.checkpoint import atomic_torch_save

    memory = {"key": key.detach().float().cpu(), "prototype": prototype.detach().float().cpu()}
    memory["count"] = torch.as_tensor(count).detach().long().cpu()
    _check_memory(memory, str(path))
    atomic_torch_save(memory, path)


def _check_memory(memory: Any, source: str) -> dict[str, Tensor]:
    if not isinstance(memory, dict) or not {"key", "prototype", "count"} <= set(memory):
        raise ConfigError(f"model.memory={source}: expected a dict with key, prototype and count (vss save_memory)")
    key, prototype, count = memory["key"], memory["prototype"], memory["count"]
    if not all(isinstance(t, Tensor) for t in (key, prototype, count)):
        raise ConfigError(f"model.memory={source}: key, prototype and count must be tensors")
    n = prototype.shape[0] if prototype.ndim == 2 else 0
    ok = (
        key.ndim == 2
        and prototype.ndim == 2
        and key.shape[1] == prototype.shape[1]
        and n > 0
        and key.shape[0] % n == 0
        and tuple(count.shape) == (n,)
    )
    if not ok:
        raise ConfigError(
            f"model.memory={source}: key {tuple(key.shape)}, prototype {tuple(prototype.shape)}, count "
            f"{tuple(count.shape)}: expected (num_classes*K, C), (num_classes, C), (num_classes,)"
        )
    return {"key": key.float(), "prototype": prototype.float(), "count": count.long()}


def load_memory(path: str | Path) -> dict[str, Tensor]:
    """Read a MAR memory written by :func:`save_memory` (shapes checked)."""
    if not Path(path).is_file():
        raise ConfigError(f"model.memory={str(path)!r} is invalid: the file does not exist (expected a memory.pt)")
    return _check_memory(torch.load(path, map_location="cpu", weights_only=True), str(path))


def load_official_memory(key_npy: str | Path, value_npy: str | Path, keys_per_class: int = 10) -> dict[str, Tensor]:
    """The official memory files (ST_Memory ``generate_memory/output/key.npy`` (190,512), class-major, and
    ``value.npy`` (19,512) prototypes) as a :func:`load_memory` dict; ``count`` is unknown (-1)."""
    key = torch.from_numpy(np.load(key_npy).astype(np.float32))
    prototype = torch.from_numpy(np.load(value_npy).astype(np.float32))
    if key.ndim != 2 or prototype.ndim != 2 or key.shape != (prototype.shape[0] * keys_per_class, prototype.shape[1]):
        raise ConfigError(
            f"{key_npy} {tuple(key.shape)} and {value_npy} {tuple(prototype.shape)}: expected (num_classes*"
            f"{keys_per_class}, C) and (num_classes, C)"
        )
    count = torch.full((prototype.shape[0],), -1, dtype=torch.long)
    return _check_memory({"key": key, "prototype": prototype, "count": count}, str(key_npy))


# -- the memory pass ---------------------------------------------------------------------------------------
class MemorySampler:
    """Official ``Memory_Sampler`` (A.5): per class, of the correctly predicted pixels, the K lowest-score ones
    (the keys: hard samples) and the K highest-score ones (their mean: the prototype), score = max softmax.

    Made order-independent: equal scores are ordered by a global pixel id, so a pass over shards (DDP ranks)
    merged with :meth:`merge` equals one pass. The official sampler's visit-order quirks (its first K samples
    always go to the keys; a sample sits in the keys or the values, never both; the random flip of its data) are
    not reproduced: with at least 2K correct pixels per class the two sets are the same as its intent.
    """

    def __init__(self, num_classes: int, dim: int, keys_per_class: int = 10, values_per_class: int = 10) -> None:
        c, kl, kh = int(num_classes), _positive_int("keys_per_class", keys_per_class), int(values_per_class)
        _positive_int("values_per_class", kh)
        self.num_classes, self.dim, self.keys_per_class, self.values_per_class = c, int(dim), kl, kh
        self.count = torch.zeros(c, dtype=torch.long)
        big = torch.iinfo(torch.long).max
        self.low = (torch.full((c, kl), float("inf")), torch.full((c, kl), big), torch.zeros(c, kl, self.dim))
        self.high = (torch.full((c, kh), -float("inf")), torch.full((c, kh), big), torch.zeros(c, kh, self.dim))

    @staticmethod
    def _keep(
        kept: tuple[Tensor, Tensor, Tensor], new: tuple[Tensor, Tensor, Tensor], c: int, k: int, lowest: bool
    ) -> None:
        """Class ``c``'s K best of the kept and the new (score, uid, feature), ordered by (score, uid)."""
        score = torch.cat([kept[0][c], new[0]])
        uid = torch.cat([kept[1][c], new[1]])
        feat = torch.cat([kept[2][c], new[2]])
        order = torch.argsort(uid, stable=True)
        order = order[torch.argsort(score[order], descending=not lowest, stable=True)][:k]
        kept[0][c], kept[1][c], kept[2][c] = score[order], uid[order], feat[order]

    def update(self, features: Tensor, scores: Tensor, labels: Tensor, uids: Tensor) -> None:
        """Add correct pixels: features (N,C), scores (N,), class labels (N,), unique pixel ids (N,)."""
        features, scores = features.detach().float().cpu(), scores.detach().float().cpu()
        labels, uids = labels.detach().long().cpu(), uids.detach().long().cpu()
        for c in labels.unique().tolist():
            pick = labels == c
            self.count[c] += int(pick.sum())
            new = (scores[pick], uids[pick], features[pick])
            self._keep(self.low, new, c, self.keys_per_class, lowest=True)
            self._keep(self.high, new, c, self.values_per_class, lowest=False)

    def merge(self, other: MemorySampler) -> None:
        """Fold in another shard's sampler (same sizes): the result equals one pass over both shards."""
        if (other.num_classes, other.dim, other.keys_per_class, other.values_per_class) != (
            self.num_classes,
            self.dim,
            self.keys_per_class,
            self.values_per_class,
        ):
            raise ValueError("MemorySampler.merge: the samplers differ in classes, channels or K")
        self.count += other.count
        for c in range(self.num_classes):
            self._keep(self.low, tuple(t[c] for t in other.low), c, self.keys_per_class, lowest=True)
            self._keep(self.high, tuple(t[c] for t in other.high), c, self.values_per_class, lowest=False)

    def memory(self, names: Sequence[str] | None = None) -> tuple[dict[str, Tensor], list[str]]:
        """The memory dict (:func:`save_memory` layout: class-major keys, prototypes, counts) and notes on the
        classes (``names``) with fewer than K correct pixels (keys tiled) or none (zero slots)."""
        kl, kh = self.keys_per_class, self.values_per_class
        names = [str(n) for n in names] if names is not None else [str(c) for c in range(self.num_classes)]
        key = torch.zeros(self.num_classes * kl, self.dim)
        prototype = torch.zeros(self.num_classes, self.dim)
        notes = []
        for c in range(self.num_classes):
            n = int(self.count[c])
            if n == 0:
                notes.append(f"class {names[c]}: no correctly predicted pixel; its {kl} key slots and prototype are 0")
                continue
            if n < kl:
                notes.append(f"class {names[c]}: {n} correct pixel(s) < {kl} keys; its keys are tiled")
            key[c * kl : (c + 1) * kl] = self.low[2][c, torch.arange(kl) % min(n, kl)]
            prototype[c] = self.high[2][c, : min(n, kh)].mean(0)
        return {"key": key, "prototype": prototype, "count": self.count.clone()}, notes

    def state(self) -> dict[str, Any]:
        """Plain tensors (what a DDP all_gather carries)."""
        return {"count": self.count, "low": self.low, "high": self.high}

    def load_state(self, state: dict[str, Any]) -> MemorySampler:
        """Set from :meth:`state`; returns self."""
        self.count, self.low, self.high = state["count"], tuple(state["low"]), tuple(state["high"])
        return self


class _Indexed(torch.utils.data.Dataset):
    """A dataset whose items also carry their index (the global pixel ids of the memory pass)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "index": i}


@torch.no_grad()
def collect_memory(
    segmenter: nn.Module,
    dataset: Any,
    sampler: MemorySampler,
    indices: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
) -> MemorySampler:
    """One pass of a trained model=stf over the labelled clips of ``dataset`` (the clip path, ``EvalClips``):
    the STF output (``features``) and the max softmax of the 1/8 logits at the pixels where the argmax equals
    the label downsampled to 1/8 (nearest), into ``sampler``."""
    from tqdm import tqdm

    segmenter.eval()
    order = list(range(len(dataset))) if indices is None else list(indices)
    loader = torch.utils.data.DataLoader(_Indexed(dataset), batch_size=1, sampler=order, num_workers=num_workers)
    for batch in tqdm(loader, desc="memory pass", disable=not progress):
        clip = batch["images"].to(device)
        n = int(batch["num_references"][0])
        out = segmenter(clip[:, clip.shape[1] - 1 - n :])
        if "features" not in out:
            raise ConfigError("the memory pass needs a model whose aggregate returns features (model=stf / stf_mar)")
        logits, feats = out["logits"].float(), out["features"].float()
        h, w = logits.shape[-2:]
        labels = F.interpolate(batch["labels"][:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        labels = labels.to(logits.device)
        score, pred = torch.softmax(logits, 1).max(1)
        correct = (pred == labels).flatten()
        uids = int(batch["index"][0]) * h * w + torch.arange(h * w, device=logits.device)
        sampler.update(
            feats.flatten(2)[0].t()[correct], score.flatten()[correct], labels.flatten()[correct], uids[correct]
        )
    return sampler


def build_memory(
    checkpoint: str,
    output_dir: str,
    split: str | None = None,
    keys_per_class: int | None = None,
    values_per_class: int = 10,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    data: dict[str, Any] | None = None,
) -> str:
    """The memory pass on a vss checkpoint of a trained model=stf: ``output_dir/memory.pt`` (for
    ``model.memory=``) and ``memory.json`` (per-class counts and notes); returns the memory.pt path.

    ``split``: the data's training split by default (as the official pass over Cityscapes train), with the
    evaluation transform (no augmentation); ``data``: overrides of the checkpoint's data config (e.g. the
    official full-resolution ``scale``, another ``root``). Under an initialised torch.distributed group every
    rank takes its whole videos and the candidates are merged, so the result equals one process; rank 0 writes.
    """
    import json

    import torch.distributed as dist
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from vss.data.datasets import VideoShardSampler
    from vss.eval import load_checkpoint
    from vss.lit import build_module

    ckpt = load_checkpoint(checkpoint)
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    own = {"num_workers": num_workers, "persistent_workers": False}
    datamodule = instantiate(OmegaConf.merge(cfg.data, dict(data or {}), own))
    module = build_module(cfg, datamodule.num_classes, datamodule.class_names)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    seg = module.segmenter.to(device).eval()
    aggregator = seg.aggregator
    if not isinstance(aggregator, STFMAR):
        raise ConfigError(
            f"{checkpoint}: the memory pass reads a model=stf checkpoint, not {type(aggregator).__name__}"
        )
    k = int(keys_per_class or aggregator.keys_per_class)
    datamodule.setup("fit")
    split = split or datamodule.splits["fit"]
    datamodule.use_clip_path(seg.references, 1 + len(seg.offsets))
    dataset = datamodule.eval_dataset(split)
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    indices = VideoShardSampler(dataset, world, rank).indices if world > 1 else None
    sampler = MemorySampler(datamodule.num_classes, aggregator.stf.pe_enc.shape[1], k, values_per_class)
    collect_memory(seg, dataset, sampler, indices, device, num_workers, progress and rank == 0)
    if world > 1:
        states: list[Any] = [None] * world
        dist.all_gather_object(states, sampler.state())
        sampler = MemorySampler(datamodule.num_classes, sampler.dim, k, values_per_class)
        for state in states:
            sampler.merge(MemorySampler(sampler.num_classes, sampler.dim, k, values_per_class).load_state(state))
    names = [str(n) for n in (datamodule.class_names or range(datamodule.num_classes))]
    memory, notes = sampler.memory(names)
    out = Path(output_dir) / "memory.pt"
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_memory(out, memory["key"], memory["prototype"], memory["count"])
        report = {
            "checkpoint": str(checkpoint),
            "split": split,
            "clips": len(dataset),
            "keys_per_class": k,
            "values_per_class": values_per_class,
            "correct_pixels": {str(n): int(c) for n, c in zip(names, memory["count"].tolist(), strict=True)},
            "notes": notes,
        }
        tmp = out.with_name("memory.json.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(out.with_name("memory.json"))
        counts = ", ".join(f"{n} {c}" for n, c in report["correct_pixels"].items())
        print(f"[vss] memory pass over {len(dataset)} {split} clips: correct pixels per class: {counts}")
        for note in notes:
            print(f"[vss] memory: {note}")
        print(
            f"[vss] memory written to {out} (key {tuple(memory['key'].shape)}, prototype "
            f"{tuple(memory['prototype'].shape)})"
        )
    return str(out)


# -- the aggregator ----------------------------------------------------------------------------------------
class STFMAR(Aggregator):
    """PSPNet + STF (+ MAR with ``mar=true``); see the module docstring.

    ``aggregate`` returns ``logits`` (1/8) and ``features``, the STF output before MAR (what the memory pass
    reads of a stage-1 model; returned at inference too, it costs nothing).
    """

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Block-size multiples of the crop and evaluation sizes; MAR without a memory (:func:`check_train_config`)."""
        check_train_config(cfg)

    @classmethod
    def single_frame_baseline(cls, model_cfg: Any) -> Any:
        """PSPNet with the same head (:func:`single_frame_baseline`)."""
        return single_frame_baseline(model_cfg)

    @classmethod
    def import_official(cls, state_dict: dict[str, Tensor]) -> ImportResult:
        """The official ST_Memory checkpoints (:func:`import_official_checkpoint`)."""
        return import_official_checkpoint(state_dict)

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        offsets: Sequence[int] = (-1, 1),
        mar: bool = False,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        depth: int = 1,
        num_heads: int = 2,
        mlp_dim: int = 256,
        block_size: Sequence[int] | str = (16, 16),
        pe_size: Sequence[int] = (128, 256),
        dropout: float = 0.1,
        keys_per_class: int = 10,
        memory: str | None = None,
        avg_non_ignore: bool = False,
        compile: bool = False,
        encoder_name: str | None = None,
    ) -> None:
        super().__init__(in_channels, num_classes, offsets, avg_non_ignore, compile)
        if encoder_name is not None and not str(encoder_name).startswith("resnet"):
            raise ConfigError(
                f"model=stf/stf_mar needs a dilated ResNet encoder (output stride 8, e.g. encoder=resnet50c); "
                f"encoder.name={encoder_name!r} is not one"
            )
        if not isinstance(mar, bool):
            raise ConfigError(f"model.mar={mar!r} is invalid: expected true or false")
        if not self.offsets:
            raise ConfigError("model.offsets=[] is invalid for STF: expected reference frames, e.g. [-1,1]")
        channels = _positive_int("channels", channels)
        num_heads = _positive_int("num_heads", num_heads)
        if channels % num_heads:
            raise ConfigError(f"model.num_heads={num_heads} is invalid: model.channels={channels} must divide by it")
        mlp_dim, depth = _positive_int("mlp_dim", mlp_dim), _positive_int("depth", depth)
        keys_per_class = _positive_int("keys_per_class", keys_per_class)
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"model.dropout={dropout!r} is invalid: expected a probability in [0, 1)")
        if memory is not None and not mar:
            raise ConfigError(
                f"model.memory={memory!r} is set but model.mar=false: the memory is MAR's (model=stf_mar)"
            )
        self.mar_enabled, self.keys_per_class = mar, keys_per_class
        # the frames in time order: the references (offsets order) and the target (offset 0) sorted by offset
        self.time_order = sorted(range(len(self.offsets) + 1), key=lambda i: (*self.offsets, 0)[i])
        self.target_index = sum(o < 0 for o in self.offsets)
        self.decode_head = PSPHead(self.in_channels[-1], num_classes, channels, pool_scales, dropout)
        self.stf = SpatialTemporalFusion(
            channels,
            len(self.offsets) + 1,
            depth,
            num_heads,
            mlp_dim,
            block_size,
            pe_size,
            dropout,
            self.target_index,
        )
        if mar:
            self.mar = MemoryAugmentedRefinement(channels, num_classes, keys_per_class, mlp_dim, dropout)
            if memory is not None:  # else random until loaded (a checkpoint's); training says so (check_train_config)
                self.mar.set_memory(load_memory(memory), str(memory))

    def encode(self, feats: list[Tensor]) -> FrameFeatures:
        """The PSP bottleneck feature of each frame (official ``decode_head(x, return_feat=True)``)."""
        return {"feature": self.decode_head.bottleneck_features(feats[-1])}

    def aggregate(self, target: FrameFeatures, references: list[FrameFeatures]) -> dict[str, Tensor]:
        """STF over the frames in time order (target as the decoder query), MAR, ``conv_seg``; no references:
        STF over the target alone (T=1, the target's slice of ``pe_enc``)."""
        if references and len(references) != len(self.offsets):
            raise ConfigError(
                f"STF reads {len(self.offsets)} reference frames (model.offsets={list(self.offsets)}), got "
                f"{len(references)}"
            )
        if references:
            items = [*references, target]
            frames = torch.stack([items[i]["feature"] for i in self.time_order], 1)
            x = self.stf(frames, self.target_index)
        else:
            x = self.stf(target["feature"].unsqueeze(1), 0)
        refined = self.mar(x) if self.mar_enabled else x
        return {"logits": self.decode_head.classify(refined), "features": x}


def single_frame_baseline(model_cfg: Any) -> Any:
    """The single-frame baseline of model=stf / stf_mar (``vss.bench baseline=true``): PSPNet with the same head."""
    from functools import partial

    from vss.models.aggregators.pspnet import PSPNet

    keys = ("channels", "pool_scales", "dropout")
    return partial(PSPNet, **{k: model_cfg[k] for k in keys if k in model_cfg})


# -- the official checkpoints ------------------------------------------------------------------------------
# ``python -m vss.convert --model stf|stf_mar`` calls :meth:`STFMAR.import_official`. The names
# are read from the official code (jfzhuang/ST_Memory): ``SegRefine`` (exp/cityscapes/psp50/{STF,MAR}/model/
# refine.py) holds ``pspnet`` (mmseg pspnet_r50-d8: ``backbone``, ``decode_head``, ``auxiliary_head``), ``STF`` and,
# in the MAR stage, ``MAR`` (lib/net/transformer.py), built of lib/net/transformer_block.py's layers.
# STF/python/train.py saves ``net.module.state_dict()``; MAR/python/test.py loads the MAR stage's file strictly. A
# ``module.`` prefix on every key (a DataParallel / DDP wrapper saved as a whole) is stripped.

_MHA = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
_AFFINE = ("weight", "bias")
#: The official ISA_Block / ISA_Block_CA attentions -> ours (InterlacedSparseAttention).
_ISA = (("self_attn_short", "short_range"), ("self_attn_long", "long_range"))
#: Official PSPNet keys a SegRefine file must hold (the rest of ``pspnet.*`` is checked by the strict load).
_PSPNET_ANCHORS = (
    "pspnet.backbone.stem.0.weight",
    "pspnet.decode_head.bottleneck.conv.weight",
    "pspnet.decode_head.conv_seg.weight",
    "pspnet.decode_head.conv_seg.bias",
)
_SHOWN = 4


def _isa_names(official: str, ours: str) -> dict[str, str]:
    return {f"{official}.{o}.{p}": f"{ours}.{s}.{p}" for o, s in _ISA for p in _MHA}


def _ffn_norm_names(official: str, ours: str, norms: int) -> dict[str, str]:
    """``linear1``/``linear2`` -> ``ffn.0``/``ffn.3``; ``norm1..norms`` -> the same names."""
    names = {f"{official}.linear{i}.{p}": f"{ours}.ffn.{j}.{p}" for i, j in ((1, 0), (2, 3)) for p in _AFFINE}
    return names | {f"{official}.norm{i}.{p}": f"{ours}.norm{i}.{p}" for i in range(1, norms + 1) for p in _AFFINE}


def official_names(depth: int = 1, mar: bool = True) -> dict[str, str]:
    """Every official ``STF.*`` (and, with ``mar``, ``MAR.*``) tensor name of a ``depth``-layer STF -> ours (under
    ``aggregator.``); ``STF.pe_enc`` first."""
    names = {"STF.pe_enc": "stf.pe_enc", "STF.pe_dec": "stf.pe_dec"}
    for i in range(depth):
        enc, dec = f"STF.encoder.layers.{i}", f"STF.decoder.layers.{i}"
        names |= _isa_names(f"{enc}.self_attn", f"stf.encoder_layers.{i}.attn")
        names |= _ffn_norm_names(enc, f"stf.encoder_layers.{i}", 2)
        names |= _isa_names(f"{dec}.self_attn", f"stf.decoder_layers.{i}.self_attn")
        names |= _isa_names(f"{dec}.multihead_attn", f"stf.decoder_layers.{i}.cross_attn")
        names |= _ffn_norm_names(dec, f"stf.decoder_layers.{i}", 3)
    if mar:
        layer = "MAR.HEdecoder"
        names |= {"MAR.memory_key": "mar.memory_key", "MAR.memory_value": "mar.memory_value"}
        names |= {
            f"{layer}.attn.{p}.{j}.weight": f"mar.{p}.{j}.weight" for p in ("to_q", "to_k", "to_v") for j in range(3)
        }
        names |= {f"{layer}.attn.to_out.0.{p}": f"mar.proj.{p}" for p in _AFFINE}
        names |= _ffn_norm_names(layer, "mar", 2)
    return names


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return f"{shown}, ... (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else shown


def _strip_module(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Without the ``module.`` prefix of a DataParallel / DDP wrapper when every key has it."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict


def convert_official_state_dict(
    state_dict: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, str], list[str], list[str], list[str]]:
    """An official ``SegRefine`` state_dict (``pspnet.*``, ``STF.*``, ``MAR.*``; ``module.`` stripped) -> Segmenter
    keys. Returns the tensors, the official name of each, the dropped keys (mmseg's auxiliary head) and the
    expected official keys missing and the unexpected keys found."""
    from vss.models.aggregators.pspnet import pspnet_keys

    state = _strip_module(state_dict)
    depth = len({k.split(".")[3] for k in state if k.startswith("STF.encoder.layers.")})
    expected = official_names(max(depth, 1), any(k.startswith("MAR.") for k in state))
    missing = [k for k in (*expected, *_PSPNET_ANCHORS) if k not in state]
    psp = {k.removeprefix("pspnet."): v for k, v in state.items() if k.startswith("pspnet.")}
    psp_out, psp_origin, dropped, psp_unknown = pspnet_keys(psp)
    out = dict(psp_out)
    origin = {k: f"pspnet.{v}" for k, v in psp_origin.items()}
    for k, v in state.items():
        if k in expected:
            if k in ("MAR.memory_key", "MAR.memory_value") and v.ndim == 3 and v.shape[0] == 1:
                v = v[0]  # official (1, K*num_class, C)
            out[f"aggregator.{expected[k]}"], origin[f"aggregator.{expected[k]}"] = v, k
    unknown = {f"pspnet.{k}" for k in psp_unknown}
    unexpected = [k for k in state if k in unknown or not (k.startswith("pspnet.") or k in expected)]  # file order
    return out, origin, [f"pspnet.{k}" for k in dropped], missing, unexpected


def _layout_error(state: dict[str, Tensor], missing: list[str], unexpected: list[str]) -> ConfigError:
    """The one-line error for a file that is not an official ST_Memory SegRefine state_dict."""
    msg = (
        "not an official ST_Memory checkpoint (the state_dict of SegRefine: pspnet.*, STF.*, MAR.* in the MAR "
        f"stage): {len(missing)} expected keys missing ({_listing(missing) or 'none'}); {len(unexpected)} "
        f"unexpected keys found ({_listing(unexpected) or 'none'})"
    )
    if "backbone.stem.0.weight" in state and not any(k.startswith("STF.") for k in state):
        msg += "; it looks like an mmseg PSPNet checkpoint: --model pspnet"
    return ConfigError(msg)


def import_official_checkpoint(state_dict: dict[str, Tensor]) -> ImportResult:
    """An official ST_Memory ``SegRefine`` state_dict (STF stage: ``pspnet.*``, ``STF.*``; MAR stage: also ``MAR.*``;
    with or without ``module.``) -> Segmenter tensors + the config they imply: ``model=stf_mar`` when ``MAR.*`` is
    present (else ``model=stf``), ``encoder=resnet50c``, the number of classes (``conv_seg``), the widths, the
    positional tables' grid and the memory's keys per class (vss.convert picks the data set and class names from the
    count). A file of another layout is a ConfigError naming the missing and unexpected keys."""
    from vss.checkpoint import ImportResult
    from vss.models.aggregators.pspnet import check_resnet50_v1c

    state = _strip_module(state_dict)
    converted, origin, dropped, missing, unexpected = convert_official_state_dict(state)
    if missing or unexpected:
        raise _layout_error(state, missing, unexpected)
    check_resnet50_v1c({k.removeprefix("pspnet."): v for k, v in state.items() if k.startswith("pspnet.backbone.")})
    pe, mlp = state["STF.pe_enc"], int(state["STF.encoder.layers.0.linear1.weight"].shape[0])
    num_classes = int(state["pspnet.decode_head.conv_seg.weight"].shape[0])
    depth = len({k.split(".")[3] for k in state if k.startswith("STF.encoder.layers.")})
    has_mar = "MAR.memory_key" in state
    overrides = [
        f"model={'stf_mar' if has_mar else 'stf'}",
        "encoder=resnet50c",
        f"data.num_classes={num_classes}",
        f"model.channels={int(pe.shape[1])}",
        f"model.pe_size=[{int(pe.shape[3])},{int(pe.shape[4])}]",
        f"model.depth={depth}",
        f"model.mlp_dim={mlp}",
    ]
    if has_mar:
        overrides.append(f"model.keys_per_class={_keys_per_class(state, num_classes, mlp)}")
    return ImportResult(
        state_dict=converted,
        overrides=overrides,
        defaults=[],
        origin=origin,
        dropped=dropped,
        unknown=[],
    )


def _keys_per_class(state: dict[str, Tensor], num_classes: int, mlp: int) -> int:
    """K of the MAR memory (official KL = KH = 10), checked against what :class:`MemoryAugmentedRefinement` builds:
    KL = KH and MAR's width (official ``dim // 2``) equal to STF's ``mlp_dim``."""
    slots, values = state["MAR.memory_key"].shape[-2], state["MAR.memory_value"].shape[-2]
    if slots % num_classes or slots != values:
        raise ConfigError(
            f"MAR.memory_key has {slots} slots and MAR.memory_value {values} for {num_classes} classes: vss builds "
            "K keys and K values per class (official KL = KH = 10)"
        )
    width = int(state["MAR.HEdecoder.linear1.weight"].shape[0])
    if width != mlp:
        raise ConfigError(
            f"MAR's width {width} (MAR.HEdecoder.linear1) differs from STF's {mlp} (STF.encoder.layers.0.linear1): "
            "vss builds both with model.mlp_dim (official: 256 and 512 // 2)"
        )
    return slots // num_classes


def main(argv: Sequence[str] | None = None) -> int:
    """The memory files: ``--ckpt STF.ckpt --out DIR`` runs the memory pass on a trained model=stf (DIR/memory.pt);
    ``--key key.npy --value value.npy --out memory.pt`` converts the official files."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m vss.models.aggregators.stf_mar", description=main.__doc__)
    parser.add_argument("--ckpt", help="memory pass: a vss checkpoint of a trained model=stf")
    parser.add_argument("--split", help="memory pass: the split to read (default: the data's training split)")
    parser.add_argument("--device", default="cpu", help="memory pass: cpu or cuda")
    parser.add_argument("--num-workers", type=int, default=0, help="memory pass: DataLoader workers")
    parser.add_argument("--key", help="official key.npy (num_classes*K, C)")
    parser.add_argument("--value", help="official value.npy (num_classes, C)")
    parser.add_argument("--keys-per-class", type=int, default=None, help="K (official: 10)")
    parser.add_argument("--out", required=True, help="memory pass: the output folder; conversion: memory.pt")
    args = parser.parse_args(argv)
    if bool(args.ckpt) == bool(args.key or args.value) or (not args.ckpt and not (args.key and args.value)):
        parser.error("give --ckpt (the memory pass) or both --key and --value (the official files)")
    try:
        if args.ckpt:
            build_memory(args.ckpt, args.out, args.split, args.keys_per_class, 10, args.device, args.num_workers)
            return 0
        memory = load_official_memory(args.key, args.value, args.keys_per_class or 10)
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_memory(args.out, memory["key"], memory["prototype"], memory["count"])
    print(f"[vss] {args.out}: key {tuple(memory['key'].shape)}, prototype {tuple(memory['prototype'].shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
