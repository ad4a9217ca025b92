"""Independent re-implementation of the official STF and MAR modules (jfzhuang/ST_Memory ``lib/net/transformer.py``,
``transformer_block.py: ISA_Block, ISA_Block_CA``), written from the notes (../shared/reference/stf-mar-official.md
A.4, A.6, A.11), with the official token layout of A.4 (sequence-first ``nn.MultiheadAttention``, the
``view/permute/reshape`` index mapping of A.11) and the official parameter names as the notes imply them.

Used only by the tests, as the parity and checkpoint-import oracle. Names (inferred, DETR style):
``STF``: ``pe_enc``, ``pe_dec``, ``encoder.layers.{i}.{self_attn.{long_attn,short_attn},linear1,linear2,norm1,norm2}``,
``decoder.layers.{i}.{self_attn,multihead_attn}.{long_attn,short_attn}``, ``linear1``, ``linear2``, ``norm1..3``;
``MAR``: ``memory_key`` (1,N,C), ``memory_value`` (1,N,C), ``transformer.{to_q,to_k,to_v}.{0,1,2}.weight``,
``transformer.to_out``, ``transformer.linear1/linear2``, ``transformer.norm1/norm2``.
As the official code, the positional tables are always resized (trilinear, ``F.interpolate``'s default
``align_corners``), whether or not the size changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def to_long(x: Tensor, block: tuple[int, int]) -> Tensor:
    """[n,c,t,H,W] -> (t*bh*bw, n*ph*pw, c): sequence tau*bh*bw + i*bw + j, batch n'*ph*pw + a*pw + b (A.4)."""
    n, c, t, h, w = x.shape
    ph, pw = block
    bh, bw = h // ph, w // pw
    return x.reshape(n, c, t, bh, ph, bw, pw).permute(2, 3, 5, 0, 4, 6, 1).reshape(t * bh * bw, n * ph * pw, c)


def long_to_short(v: Tensor, n: int, t: int, h: int, w: int, block: tuple[int, int]) -> Tensor:
    """The long step's output -> (t*ph*pw, n*bh*bw, c): sequence tau*ph*pw + a*pw + b, batch n'*bh*bw + i*bw + j."""
    ph, pw = block
    bh, bw = h // ph, w // pw
    c = v.shape[-1]
    return v.reshape(t, bh, bw, n, ph, pw, c).permute(0, 4, 5, 3, 1, 2, 6).reshape(t * ph * pw, n * bh * bw, c)


def to_short(x: Tensor, block: tuple[int, int]) -> Tensor:
    """[n,c,t,H,W] straight into the short-range layout (for the positional encoding)."""
    n, c, t, h, w = x.shape
    ph, pw = block
    bh, bw = h // ph, w // pw
    return x.reshape(n, c, t, bh, ph, bw, pw).permute(2, 4, 6, 0, 3, 5, 1).reshape(t * ph * pw, n * bh * bw, c)


def from_short(y: Tensor, n: int, t: int, h: int, w: int, block: tuple[int, int]) -> Tensor:
    """(t*ph*pw, n*bh*bw, c) -> [n,c,t,H,W]."""
    ph, pw = block
    bh, bw = h // ph, w // pw
    c = y.shape[-1]
    return y.reshape(t, ph, pw, n, bh, bw, c).permute(3, 6, 0, 4, 1, 5, 2).reshape(n, c, t, h, w)


class ISABlock(nn.Module):
    """``ISA_Block``: long-range MHA over the stride-block lattice across frames, then short-range MHA per window."""

    def __init__(self, dim: int, heads: int, block: tuple[int, int] = (16, 16), dropout: float = 0.1) -> None:
        super().__init__()
        self.block = block
        self.long_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
        self.short_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        n, c, t, h, w = q.shape
        pos = pos.expand(n, -1, -1, -1, -1)
        out = self.long_attn(to_long(q + pos, self.block), to_long(k + pos, self.block), to_long(v, self.block))[0]
        out = long_to_short(out, n, t, h, w, self.block)
        p = to_short(pos, self.block)
        out = self.short_attn(out + p, out + p, out)[0]
        return from_short(out, n, t, h, w, self.block)


class ISABlockCA(nn.Module):
    """``ISA_Block_CA``: long-range cross-attention (target T=1 vs memory T), short-range self-attention (target)."""

    def __init__(self, dim: int, heads: int, block: tuple[int, int] = (16, 16), dropout: float = 0.1) -> None:
        super().__init__()
        self.block = block
        self.long_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
        self.short_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, query_pos: Tensor, pos: Tensor) -> Tensor:
        n, c, t, h, w = q.shape
        query_pos = query_pos.expand(n, -1, -1, -1, -1)
        pos = pos.expand(n, -1, -1, -1, -1)
        out = self.long_attn(to_long(q + query_pos, self.block), to_long(k + pos, self.block), to_long(v, self.block))[
            0
        ]
        out = long_to_short(out, n, t, h, w, self.block)
        p = to_short(query_pos, self.block)
        out = self.short_attn(out + p, out + p, out)[0]
        return from_short(out, n, t, h, w, self.block)


def _channels_last(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 4, 1)


def _channels_first(x: Tensor) -> Tensor:
    return x.permute(0, 4, 1, 2, 3)


class TransformerEncoderLayer(nn.Module):
    """Post-norm: x = LN(x + drop(ISA(x,x,x,pos))); x = LN(x + drop(W2 drop(ReLU(W1 x))))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, block: tuple[int, int], dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = ISABlock(dim, heads, block, dropout)
        self.linear1 = nn.Linear(dim, mlp_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(mlp_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        """[n,c,t,h,w] -> [n,c,t,h,w] (LayerNorm and FFN over c)."""
        x = _channels_last(src) + self.dropout1(_channels_last(self.self_attn(src, src, src, pos)))
        x = self.norm1(x)
        x = self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))
        return _channels_first(x)


class TransformerDecoderLayer(nn.Module):
    """Post-norm: ISA self-attention (query_pos), ISA_Block_CA cross-attention, FFN; each add & LN."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, block: tuple[int, int], dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = ISABlock(dim, heads, block, dropout)
        self.multihead_attn = ISABlockCA(dim, heads, block, dropout)
        self.linear1 = nn.Linear(dim, mlp_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(mlp_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        x = self.norm1(_channels_last(tgt) + self.dropout1(_channels_last(self.self_attn(tgt, tgt, tgt, query_pos))))
        t1 = _channels_first(x)
        x = self.norm2(x + self.dropout2(_channels_last(self.multihead_attn(t1, memory, memory, query_pos, pos))))
        x = self.norm3(x + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x))))))
        return _channels_first(x)


class LayerStack(nn.Module):
    """Holds ``layers`` (official ``encoder.layers`` / ``decoder.layers``)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class STF(nn.Module):
    """``STF(dim, depth, heads, mlp_dim, pe_dim)``: encoder over the T frames, decoder with the target as query."""

    def __init__(
        self,
        dim: int = 512,
        depth: int = 1,
        heads: int = 2,
        mlp_dim: int = 256,
        pe_dim: tuple[int, int] = (128, 256),
        num_frames: int = 3,
        block: tuple[int, int] = (16, 16),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.pe_enc = nn.Parameter(torch.rand(1, dim, num_frames, *pe_dim))
        self.pe_dec = nn.Parameter(torch.rand(1, dim, 1, *pe_dim))
        self.encoder = LayerStack([TransformerEncoderLayer(dim, heads, mlp_dim, block, dropout) for _ in range(depth)])
        self.decoder = LayerStack([TransformerDecoderLayer(dim, heads, mlp_dim, block, dropout) for _ in range(depth)])
        for p in self.parameters():  # weight_init
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: Tensor, query: Tensor) -> Tensor:
        """x [n,c,T,h,w] (the frames in time order), query [n,c,1,h,w] (the raw target) -> [n,c,h,w]."""
        t, h, w = x.shape[2:]
        pos = F.interpolate(self.pe_enc, size=(t, h, w), mode="trilinear")
        query_pos = F.interpolate(self.pe_dec, size=(1, h, w), mode="trilinear")
        memory = x
        for layer in self.encoder.layers:
            memory = layer(memory, pos)
        out = query
        for layer in self.decoder.layers:
            out = layer(out, memory, pos, query_pos)
        return out.squeeze(2)


class TransformerHELayer(nn.Module):
    """MAR's layer: pixels attend over the memory (single head, unscaled), add & LN, FFN, add & LN."""

    def __init__(self, d_model: int = 512, dim_feedforward: int = 256, dropout: float = 0.1) -> None:
        super().__init__()

        def stack() -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(d_model, d_model, bias=False),
                nn.Linear(d_model, dim_feedforward, bias=False),
                nn.Linear(dim_feedforward, dim_feedforward, bias=False),
            )

        self.to_q, self.to_k, self.to_v = stack(), stack(), stack()
        self.to_out = nn.Linear(dim_feedforward, d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """x (n, HW, C), key/value (1, N, C) -> (n, HW, C)."""
        q, k, v = self.to_q(x), self.to_k(key), self.to_v(value)
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1)
        x = self.norm1(x + self.dropout1(self.to_out(torch.matmul(attn, v))))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class MAR(nn.Module):
    """``MAR(dim, mlp_dim, KL, KH, num_class)``: memory_key / memory_value (1, num_class*KL, dim)."""

    def __init__(self, dim: int = 512, mlp_dim: int = 256, KL: int = 10, KH: int = 10, num_class: int = 19) -> None:  # noqa: N803
        super().__init__()
        self.memory_key = nn.Parameter(torch.randn(1, num_class * KL, dim))
        self.memory_value = nn.Parameter(torch.randn(num_class, dim).repeat_interleave(KL, 0).unsqueeze(0))
        self.transformer = TransformerHELayer(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        """[n,c,h,w] -> [n,c,h,w]."""
        n, c, h, w = x.shape
        out = self.transformer(x.flatten(2).transpose(1, 2), self.memory_key, self.memory_value)
        return out.transpose(1, 2).reshape(n, c, h, w)
