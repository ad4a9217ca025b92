"""Independent re-implementation of SegFormer's MixVisionTransformer with the official parameter names.

Used only by the tests as a parity oracle: module structure, parameter names and forward computation
follow the official `mix_transformer.py` of NVlabs/SegFormer (stochastic depth is left out: eval only).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MIT_CONFIGS: dict[str, dict[str, list[int]]] = {
    "mit_b0": {"embed_dims": [32, 64, 160, 256], "depths": [2, 2, 2, 2]},
    "mit_b1": {"embed_dims": [64, 128, 320, 512], "depths": [2, 2, 2, 2]},
}
NUM_HEADS = [1, 2, 5, 8]
SR_RATIOS = [8, 4, 2, 1]
MLP_RATIO = 4
EPS = 1e-6  # eps of block norms and stage-final norms; patch-embed and sr norms keep nn.LayerNorm's 1e-5


def to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def to_map(x: Tensor, h: int, w: int) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows, then LayerNorm over channels."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_ch, out_ch, kernel_size=kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(out_ch)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        """Return tokens and the new spatial size."""
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(to_tokens(x)), h, w


class Attention(nn.Module):
    """Efficient self-attention: keys/values from a spatially reduced (sr conv) token map."""

    def __init__(self, dim: int, heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        """Multi-head attention of all tokens against the reduced tokens."""
        b, n, c = x.shape
        d = c // self.heads
        q = self.q(x).view(b, n, self.heads, d).transpose(1, 2)
        src = x
        if self.sr_ratio > 1:
            src = self.norm(to_tokens(self.sr(to_map(x, h, w))))
        k, v = self.kv(src).view(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
        out = torch.matmul(self.attn_drop(weights), v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class DWConv(nn.Module):
    """3x3 depthwise conv on the token map (holds the official `dwconv.dwconv` name)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        """Apply the depthwise conv to tokens laid out as an h x w map."""
        return to_tokens(self.dwconv(to_map(x, h, w)))


class MixFFN(nn.Module):
    """fc1 -> depthwise conv -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        """Mix-FFN of the tokens."""
        x = self.drop(self.act(self.dwconv(self.fc1(x), h, w)))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.attn = Attention(dim, heads, sr_ratio)
        self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.mlp = MixFFN(dim, dim * MLP_RATIO)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        """Two residual sub-layers."""
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixVisionTransformer(nn.Module):
    """Four stages: patch_embed{i} -> block{i} -> norm{i}; returns the NCHW map of every stage."""

    def __init__(self, embed_dims: list[int], depths: list[int], num_classes: int = 1000) -> None:
        super().__init__()
        in_ch = 3
        for i, (dim, depth) in enumerate(zip(embed_dims, depths, strict=True), start=1):
            kernel, stride = (7, 4) if i == 1 else (3, 2)
            setattr(self, f"patch_embed{i}", OverlapPatchEmbed(in_ch, dim, kernel, stride))
            blocks = [Block(dim, NUM_HEADS[i - 1], SR_RATIOS[i - 1]) for _ in range(depth)]
            setattr(self, f"block{i}", nn.ModuleList(blocks))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=EPS))
            in_ch = dim
        self.head = nn.Linear(embed_dims[-1], num_classes)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return the 4 stage outputs (B, C_i, H/s_i, W/s_i)."""
        outs = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, h, w)
            x = to_map(getattr(self, f"norm{i}")(x), h, w).contiguous()
            outs.append(x)
        return outs


def build_reference_mit(variant: str) -> MixVisionTransformer:
    """Build the reference MiT `variant` ("mit_b0" or "mit_b1") with an ImageNet head."""
    return MixVisionTransformer(**MIT_CONFIGS[variant])
