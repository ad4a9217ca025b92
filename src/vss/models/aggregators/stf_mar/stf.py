"""STF, the Spatial-Temporal Fusion transformer: one post-norm encoder layer over the frames and one decoder layer
with the target as query, every attention a 3-D interlaced sparse attention (official ``STF``, ``ISA_Block``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vss.errors import ConfigError
from vss.models.aggregators.stf_mar.checks import OUTPUT_STRIDE, auto_block, block_size_value, pair


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


def feed_forward(dim: int, hidden: int, dropout: float) -> nn.Sequential:
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
        self.ffn = feed_forward(dim, mlp_dim, dropout)
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
        self.ffn = feed_forward(dim, mlp_dim, dropout)
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
        pe_h, pe_w = pair("pe_size", pe_size)
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
