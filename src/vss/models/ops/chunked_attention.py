"""Layouts of timm transformer blocks that compute only what is read (the last tokens) or run the token-wise parts
in chunks (MSAF's inference path): each the same function as the block over the whole sequence."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

__all__ = [
    "PIXEL_TOKENS",
    "TOKEN_CHUNK",
    "inference_layout",
    "per_pixel_chunked",
    "spatial_chunked",
    "tail_attention",
    "tail_block",
]


def tail_attention(attn: nn.Module, x: Tensor, k: int) -> Tensor:
    """``attn(x)[:, -k:]`` of a timm ``Attention`` over sequences x (M, L, C): only the last k tokens' queries
    are projected and attend (to every token's key and value); the same function, (M, k, C)."""
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError("gated attention")
    m, n, c = x.shape
    heads, dim = attn.num_heads, attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(x[:, n - k :], weight[:c], None if bias is None else bias[:c]).view(m, k, heads, dim).transpose(1, 2)
    kv = F.linear(x, weight[c:], None if bias is None else bias[c:]).view(m, n, 2, heads, dim)
    key, value = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (M,heads,L,dim)
    q, key = attn.q_norm(q), attn.k_norm(key)
    out = F.scaled_dot_product_attention(q, key, value, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    return attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(m, k, heads * dim))))


def tail_block(block: Block, x: Tensor, k: int = 1) -> Tensor:
    """``block(x)[:, -k:]`` of a timm pre-norm block (MSAF eq. 3) over sequences x (M, L, C), with the queries,
    projection, residuals, LayerNorm and MLP run on the last k tokens only: their outputs read the other
    tokens through their keys and values alone. The same function, (M, k, C)."""
    y = x[:, x.shape[1] - k :] + block.drop_path1(block.ls1(tail_attention(block.attn, block.norm1(x), k)))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


# Chunk sizes of the inference layouts: the largest intermediate of a chunk (the MLP's 4C activations) stays at
# 16 MiB for C = 256, below glibc's 32 MiB mmap ceiling (a bigger buffer is mapped and page-faulted afresh at each
# call), with few chunks: on a shared CPU each op's threads wait for each other, so every extra op costs there
# (512-pixel chunks were 1.4x faster on a quiet box but 2x slower than one call when another job held the cores).
PIXEL_TOKENS = 4096  # tokens per chunk of the per-pixel transformers (per_pixel_chunked): 1024 pixels of 4
TOKEN_CHUNK = 4096  # tokens per chunk of the spatial blocks' token-wise parts (spatial_chunked)


def inference_layout() -> bool:
    """Whether the chunked inference layouts run: autograd records nothing (``no_grad`` / ``inference_mode``) and
    ``torch.compile`` is not tracing (it fuses the straightforward formulation itself)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def per_pixel_chunked(block: Block, maps: Sequence[Tensor], embed: Tensor, tail: int | None = None) -> Tensor:
    """MSAF's ``_per_pixel`` flattened to (B, L*C, H, W) (``tail`` None) or ``_per_pixel_last`` (``tail`` = 1),
    ``PIXEL_TOKENS`` tokens' pixels at a time: every pixel's tokens are independent of the others', so this is
    the same function, but each chunk's tokens, q/k/v and MLP activations are reused heap buffers (the whole
    map's are 100+ MiB buffers, freshly mapped and faulted in at every call). The chunks are written into a
    channels-last output, whose (B, H, W, L*C) storage is the token layout: no permute copies on either side."""
    b, c, h, w = maps[0].shape
    flat = [m.flatten(2).transpose(1, 2) for m in maps]  # (B, HW, C) views, whatever the maps' layouts
    chunk = max(1, PIXEL_TOKENS // len(maps))
    out = None
    for i in range(b):
        for s in range(0, h * w, chunk):
            x = torch.stack([f[i, s : s + chunk] for f in flat], 1) + embed  # (n, L, C), as MSAF's _pixel_tokens
            y = (block(x) if tail is None else tail_block(block, x, tail)).flatten(1)
            if out is None:
                out = y.new_empty(b, h * w, y.shape[1])
            out[i, s : s + chunk] = y
    return out.view(b, h, w, -1).permute(0, 3, 1, 2)


def spatial_chunked(block: Block, x: Tensor) -> Tensor:
    """MSAF's ``_spatial`` (the block over each map's tokens) with the token-wise parts (LayerNorms, q/k/v and
    output projections, residuals, MLP) run ``TOKEN_CHUNK`` tokens at a time around one attention over all tokens
    (timm's ``Attention`` spelled out, as :func:`tail_attention`): the same function, without the whole map's MLP
    activations and permute copies; the output (B, C, H, W) has channels-last strides."""
    attn = block.attn
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError("gated attention")
    b, c, h, w = x.shape
    n, heads, dim = h * w, attn.num_heads, attn.head_dim
    tokens = x.flatten(2).transpose(1, 2)  # (B, N, C) view
    qkv = None
    for s in range(0, n, TOKEN_CHUNK):
        part = attn.qkv(block.norm1(tokens[:, s : s + TOKEN_CHUNK]))
        if qkv is None:
            qkv = part.new_empty(b, n, part.shape[-1])
        qkv[:, s : s + TOKEN_CHUNK] = part
    q, k, v = qkv.view(b, n, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    a = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    a = a.transpose(1, 2)  # (B, N, heads, dim)
    out = None
    for s in range(0, n, TOKEN_CHUNK):
        e = min(n, s + TOKEN_CHUNK)
        proj = attn.proj_drop(attn.proj(attn.norm(a[:, s:e].reshape(b, e - s, heads * dim))))
        y = tokens[:, s:e] + block.drop_path1(block.ls1(proj))
        y = y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))
        if out is None:
            out = y.new_empty(b, n, c)
        out[:, s:e] = y
    return out.view(b, h, w, c).permute(0, 3, 1, 2)
