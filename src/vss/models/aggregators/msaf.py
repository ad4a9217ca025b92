"""MSAF (Su, Yin, Zhang, Luo 2023): motion alignment, state alignment and semantic assignment.

Per frame (``encode``, cacheable): F3, F4, F5 (the encoder's last three maps) projected to ``embed_dim``.
Temporal (``aggregate``): the D-Transformer (pyramid spatial transformer, eq. 2-3, then the aligned temporal
transformer, eq. 5-6) turns F5 of t-2, t-1, t into M^t; the S-Transformer (eq. 9) attends over the stage
dimension (F3^t, F4^t, F5^t, M^t) and two convolutions give the pixel descriptors P; two convolutions on M^t
give the soft mask M^t'; region descriptors R pool M^t with M^t' and P is assigned to R by scaled cosine
(eq. 13). Losses L_pd + L_rd + L_M (eq. 10, 12, 14, 15).

Table 3 rows are config values: ``motion``, ``motion_transformer`` (``vanilla`` = Baseline + TR), ``state``,
``semantics``, ``dcn``; every branch off is the single-frame baseline (encoder + 1x1 projection + the
two-conv mask head on F5, an FCN head).

Readings where the paper is silent (each with its reasons in experiments/msaf_table3.md, 'Readings'):

- transformers run at a common width ``embed_dim`` (1x1 conv projections), not at F5's channels;
- one MHSA_spa per frame position (t-2, t-1, t), DS = average pooling x4 / x2, US = bilinear;
- spatial attention has no positional encoding (eq. 3 has none; the conv features carry position);
- DCN: modulated 3x3 deformable conv (one offset group), offsets and mask from a zero-initialised 3x3 conv
  on concat(D_PST^{t-k}, D_PST^t): training starts from identity sampling positions; ``dcn_impl``: on CPU
  (``auto``) by bilinear sampling and one matmul (vss.models.deform, torchvision's function, several times
  faster than its CPU kernel), torchvision's kernel elsewhere (or ``torchvision`` / ``sampled`` anywhere);
- ``dcn=false`` feeds the PST features to MHSA_tem unaligned; ``dcn=conv`` (second reading) a plain 3x3 conv;
- MHSA_tem / MHSA_sta: per pixel, 3 frame / 4 stage tokens with a learned embedding; MHSA_sta's 4 outputs
  are concatenated and the two convs (3x3 conv-BN-ReLU, 1x1) fuse them into P;
- L_pd: a 1x1 classifier on P (P itself is an ``embed_dim`` descriptor);
- R: class softmax of M^t', normalised spatial sum of M^t per class, L2-normalised; logits = s * cos(P, R),
  s learned (initially ``scale_init`` = 10);
- w/o State: (F3, F4, F5, M) concatenated straight into the two convs (no MHSA_sta);
- w/o Semantics: the output is the average of M^t' and the P classifier (``mask_average`` = logits or
  probs), trained by L_pd + L_rd only; with the state branch off too, the output is M^t' alone;
- w/o Motion: M^t = the projected F5^t (no reference frame is read);
- Baseline + TR: one vanilla transformer block over all tokens of the three frames (learned frame embedding,
  optionally at 1/``tr_downsample`` size) in place of the D-Transformer; its target tokens are M^t.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from vss.errors import ConfigError
from vss.models.aggregators.base import Aggregator, FrameFeatures, cross_entropy, resize
from vss.models.deform import IMPLS, deform_conv2d
from vss.models.heads import ConvBNReLU
from vss.models.ops.chunked_attention import inference_layout, per_pixel_chunked, spatial_chunked, tail_block

__all__ = [
    "MSAF",
    "AlignedTemporalTransformer",
    "DecoupledTransformer",
    "DeformableAlignment",
    "PyramidSpatialTransformer",
    "StageTransformer",
    "VanillaSpatioTemporalTransformer",
    "assignment_logits",
    "region_descriptors",
]

STAGES = ("F3", "F4", "F5")


def _init_transformer(module: nn.Module) -> None:
    """ViT initialisation: truncated normal (std 0.02) linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _block(dim: int, heads: int, mlp_ratio: float) -> Block:
    """Pre-norm transformer block, eq. 3: X' = Attn(LN(X)) + X; out = MLP(LN(X')) + X'."""
    return Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True)


def _downsample(x: Tensor, factor: int) -> Tensor:
    """DS of eq. 2: average pooling by ``factor`` (partial windows at the border are averaged too)."""
    return x if factor == 1 else F.avg_pool2d(x, factor, factor, ceil_mode=True)


def _spatial(block: nn.Module, x: Tensor) -> Tensor:
    """A transformer block over the spatial tokens of each map (B,C,H,W)."""
    b, c, h, w = x.shape
    return block(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


def _pixel_tokens(maps: Sequence[Tensor], embed: Tensor) -> Tensor:
    """Maps L x (B,C,H,W) -> per-pixel token sequences (B*H*W, L, C) plus the learned token embedding."""
    x = torch.stack(list(maps), 1)  # B,L,C,H,W
    b, n, c, h, w = x.shape
    return x.permute(0, 3, 4, 1, 2).reshape(b * h * w, n, c) + embed


def _per_pixel(block: Block, maps: Sequence[Tensor], embed: Tensor) -> Tensor:
    """A transformer block over a short token sequence at each pixel: maps L x (B,C,H,W) -> (B,L,C,H,W)."""
    b, c, h, w = maps[0].shape
    return block(_pixel_tokens(maps, embed)).reshape(b, h, w, len(maps), c).permute(0, 3, 4, 1, 2)


def _per_pixel_last(block: Block, maps: Sequence[Tensor], embed: Tensor) -> Tensor:
    """The last token's output of :func:`_per_pixel`, (B,C,H,W), computing only what it reads."""
    b, c, h, w = maps[0].shape
    return tail_block(block, _pixel_tokens(maps, embed)).reshape(b, h, w, c).permute(0, 3, 1, 2)


class PyramidSpatialTransformer(nn.Module):
    """Eq. 2: D_PST^{t-k} = US(MHSA_spa^{t-k}(DS^{t-k}(F5^{t-k}))), one block per frame position."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, downsample: Sequence[int]) -> None:
        super().__init__()
        self.downsample = [int(r) for r in downsample]
        self.mhsa_spa = nn.ModuleList(_block(dim, heads, mlp_ratio) for _ in self.downsample)

    def forward(self, f5: Sequence[Tensor]) -> list[Tensor]:
        """F5 of each frame, oldest first and target last -> D_PST of each, at the target's size."""
        size = f5[-1].shape[-2:]
        spatial = spatial_chunked if inference_layout() else _spatial
        return [
            resize(spatial(blk, _downsample(x, r)), size)
            for x, blk, r in zip(f5, self.mhsa_spa, self.downsample, strict=True)
        ]


class DeformableAlignment(nn.Module):
    """Eq. 5: Y(p) = sum_k w_k m_k X(p + p_k + dp_k), modulated 3x3 DCN with offsets from the pair with frame t."""

    def __init__(self, dim: int, kernel_size: int = 3, impl: str = "auto") -> None:
        super().__init__()
        self.kernel_size, self.impl = int(kernel_size), impl
        kk = self.kernel_size**2
        self.offset = nn.Conv2d(2 * dim, 3 * kk, 3, padding=1)  # (dy, dx) per tap, then the modulation mask
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.weight = nn.Parameter(torch.empty(dim, dim, self.kernel_size, self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Conv2d's default

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        """Align ``x`` (a neighbour's D_PST) to ``target`` (D_PST^t)."""
        kk = self.kernel_size**2
        out = self.offset(torch.cat([x, target], 1))
        offset, mask = out[:, : 2 * kk], out[:, 2 * kk :].sigmoid()
        pad = self.kernel_size // 2
        return deform_conv2d(x, offset, self.weight, self.bias, padding=pad, mask=mask, impl=self.impl)


class AlignedTemporalTransformer(nn.Module):
    """Eq. 6: D_ATT = MHSA_tem(DCN^{t-2}(D^{t-2}), DCN^{t-1}(D^{t-1}), D^t), attention over frames per pixel."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, num_frames: int, dcn: bool | str = True, dcn_impl: str = "auto"
    ) -> None:
        super().__init__()
        if dcn is True:
            self.dcn: nn.ModuleList | None = nn.ModuleList(
                DeformableAlignment(dim, impl=dcn_impl) for _ in range(num_frames - 1)
            )
        elif dcn == "conv":
            self.dcn = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in range(num_frames - 1))
        else:
            self.dcn = None
        self.frame_embed = nn.Parameter(trunc_normal_(torch.zeros(1, num_frames, dim), std=0.02))
        self.mhsa_tem = _block(dim, heads, mlp_ratio)

    def align(self, d_pst: Sequence[Tensor]) -> list[Tensor]:
        """The neighbours' D_PST aligned to frame t (eq. 5), target unchanged."""
        target = d_pst[-1]
        if self.dcn is None:
            return list(d_pst)
        aligned = [
            m(x, target) if isinstance(m, DeformableAlignment) else m(x)
            for m, x in zip(self.dcn, d_pst[:-1], strict=True)
        ]
        return [*aligned, target]

    def forward(self, d_pst: Sequence[Tensor]) -> Tensor:
        """M^t: the target's output token of MHSA_tem over the aligned frames (only the target's is computed)."""
        if inference_layout():
            return per_pixel_chunked(self.mhsa_tem, self.align(d_pst), self.frame_embed, tail=1)
        return _per_pixel_last(self.mhsa_tem, self.align(d_pst), self.frame_embed)


class DecoupledTransformer(nn.Module):
    """D-Transformer (Fig. 3): pyramid spatial transformer (eq. 2-3) then aligned temporal transformer (eq. 5-6)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        downsample: Sequence[int],
        dcn: bool | str = True,
        dcn_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.pst = PyramidSpatialTransformer(dim, heads, mlp_ratio, downsample)
        self.att = AlignedTemporalTransformer(dim, heads, mlp_ratio, len(downsample), dcn, dcn_impl)

    def forward(self, f5: Sequence[Tensor]) -> Tensor:
        """F5 of t-2, t-1, t -> M^t."""
        return self.att(self.pst(f5))


class VanillaSpatioTemporalTransformer(nn.Module):
    """Baseline + TR (Table 3): one transformer block over all spatio-temporal tokens of the frames (eq. 1 cost)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, num_frames: int, downsample: int = 1) -> None:
        super().__init__()
        self.downsample = int(downsample)
        self.frame_embed = nn.Parameter(trunc_normal_(torch.zeros(1, num_frames, 1, dim), std=0.02))
        self.block = _block(dim, heads, mlp_ratio)

    def forward(self, f5: Sequence[Tensor]) -> Tensor:
        """F5 of each frame, target last -> M^t (the target's tokens)."""
        size = f5[-1].shape[-2:]
        x = torch.stack([_downsample(f, self.downsample) for f in f5], 1)  # B,T,C,h,w
        b, t, c, h, w = x.shape
        tokens = (x.flatten(3).transpose(2, 3) + self.frame_embed).reshape(b, t * h * w, c)
        out = tail_block(self.block, tokens, h * w)  # the target's tokens only (the same function)
        return resize(out.transpose(1, 2).reshape(b, c, h, w), size)


class StageTransformer(nn.Module):
    """S-Transformer, eq. 9: S_TR = MHSA_sta(F3^t, F4^t, F5^t, M^t), attention over the stage dimension per pixel."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, num_stages: int = 4) -> None:
        super().__init__()
        self.stage_embed = nn.Parameter(trunc_normal_(torch.zeros(1, num_stages, dim), std=0.02))
        self.mhsa_sta = _block(dim, heads, mlp_ratio)

    def forward(self, stages: Sequence[Tensor]) -> Tensor:
        """(F3, F4, F5, M) of the target -> the 4 output tokens concatenated (B, 4C, H, W)."""
        if inference_layout():
            return per_pixel_chunked(self.mhsa_sta, stages, self.stage_embed)
        return _per_pixel(self.mhsa_sta, stages, self.stage_embed).flatten(1, 2)


def region_descriptors(m: Tensor, soft_mask: Tensor) -> Tensor:
    """Region descriptors R (B,K,C), eq. 13: M^t pooled with the class softmax of M^t', then L2-normalised."""
    w = soft_mask.softmax(1).flatten(2)  # B,K,N
    r = torch.einsum("bkn,bcn->bkc", w, m.flatten(2)) / w.sum(-1, keepdim=True).clamp_min(1e-6)
    return F.normalize(r, dim=-1)


def assignment_logits(p: Tensor, r: Tensor, scale: Tensor | float) -> Tensor:
    """Semantic partition, eq. 13: logits (B,K,H,W) = s * cos(P(p), r_k); argmax = the nearest region."""
    return scale * torch.einsum("bchw,bkc->bkhw", F.normalize(p, dim=1), F.normalize(r, dim=-1))


class MSAF(Aggregator):
    """Motion-state alignment framework (Fig. 2); Table 3 rows by ``motion``/``state``/``semantics``/``dcn``."""

    @classmethod
    def single_frame_baseline(cls, model_cfg: Any) -> Callable[..., Aggregator]:
        """MSAF with motion, state and semantics off and no references (Table 3's "baseline" row)."""
        from hydra.utils import instantiate

        return instantiate(model_cfg, motion=False, offsets=[], state=False, semantics=False)

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        embed_dim: int = 256,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        motion: bool = True,
        motion_transformer: str = "decoupled",
        state: bool = True,
        semantics: bool = True,
        dcn: bool | str = True,
        dcn_impl: str = "auto",
        pst_downsample: Sequence[int] = (4, 2, 1),
        tr_downsample: int = 1,
        mask_average: str = "logits",
        scale_init: float = 10.0,
        weight_pd: float = 1.0,
        weight_rd: float = 1.0,
        weight_M: float = 1.0,
        avg_non_ignore: bool = False,
        compile: bool = False,
        offsets: Sequence[int] = (-2, -1),
    ) -> None:
        super().__init__(in_channels, num_classes, offsets, avg_non_ignore, compile)
        if len(self.in_channels) < 3:
            raise ConfigError(f"MSAF needs at least 3 encoder maps (F3, F4, F5), got {len(self.in_channels)}")
        if motion_transformer not in ("decoupled", "vanilla"):
            raise ConfigError(f"model.motion_transformer={motion_transformer!r}: expected 'decoupled' or 'vanilla'")
        if dcn not in (True, False, "conv"):
            raise ConfigError(f"model.dcn={dcn!r}: expected true, false or 'conv'")
        if dcn_impl not in IMPLS:
            raise ConfigError(f"model.dcn_impl={dcn_impl!r}: expected one of {', '.join(IMPLS)}")
        if mask_average not in ("logits", "probs"):
            raise ConfigError(f"model.mask_average={mask_average!r}: expected 'logits' or 'probs'")
        if not pst_downsample or any(not isinstance(r, int) or r < 1 for r in pst_downsample):
            raise ConfigError(f"model.pst_downsample={list(pst_downsample)}: expected positive integer factors")
        if int(embed_dim) < 1 or int(num_heads) < 1 or int(embed_dim) % int(num_heads):
            raise ConfigError(
                f"model.embed_dim={embed_dim} and model.num_heads={num_heads}: expected positive integers, "
                "embed_dim divisible by num_heads"
            )
        if not float(mlp_ratio) > 0:
            raise ConfigError(f"model.mlp_ratio={mlp_ratio!r} is invalid: expected a positive number")
        expected = len(pst_downsample) - 1 if motion else 0
        if len(self.offsets) != expected:
            hint = "[]: without motion alignment MSAF reads no reference frame" if not motion else "e.g. [-2,-1]"
            raise ConfigError(
                f"model.offsets={list(self.offsets)}: MSAF reads {expected} reference frame(s) (one per "
                f"model.pst_downsample entry but the last, in the order of those entries): expected {hint}"
            )
        dim = int(embed_dim)
        self.motion, self.state, self.semantics = bool(motion), bool(state), bool(semantics)
        self.motion_transformer, self.dcn, self.mask_average = motion_transformer, dcn, mask_average
        self.num_frames = len(pst_downsample)
        self.weights = {"L_pd": float(weight_pd), "L_rd": float(weight_rd), "L_M": float(weight_M)}
        # the pixel-descriptor branch exists when the state branch or the semantic assignment needs P
        self.pixel_branch = self.state or self.semantics
        stages = STAGES if self.pixel_branch else STAGES[-1:]
        self.proj = nn.ModuleDict(
            {s: nn.Conv2d(c, dim, 1) for s, c in zip(STAGES, self.in_channels[-3:], strict=True) if s in stages}
        )
        self.motion_alignment: nn.Module | None = None
        if self.motion and motion_transformer == "decoupled":
            self.motion_alignment = DecoupledTransformer(dim, num_heads, mlp_ratio, pst_downsample, dcn, dcn_impl)
        elif self.motion:
            self.motion_alignment = VanillaSpatioTemporalTransformer(
                dim, num_heads, mlp_ratio, self.num_frames, tr_downsample
            )
        self.state_alignment = StageTransformer(dim, num_heads, mlp_ratio) if self.state else None
        if self.pixel_branch:
            self.pixel_descriptor = nn.Sequential(ConvBNReLU(4 * dim, dim, 3), nn.Conv2d(dim, dim, 1))
            self.pixel_classifier = nn.Conv2d(dim, num_classes, 1)  # L_pd's auxiliary head (eq. 10)
        self.soft_mask = nn.Sequential(ConvBNReLU(dim, dim, 3), nn.Conv2d(dim, num_classes, 1))  # M^t' (eq. 12)
        self.scale = nn.Parameter(torch.tensor(float(scale_init))) if self.semantics else None
        for m in (self.motion_alignment, self.state_alignment):
            if m is not None:
                _init_transformer(m)

    def encode(self, feats: list[Tensor]) -> FrameFeatures:
        """F3, F4, F5 of each frame projected to ``embed_dim`` (F3, F4 only when the pixel branch needs them)."""
        return {s: self.proj[s](f) for s, f in zip(STAGES, feats[-3:], strict=True) if s in self.proj}

    def reference_features(self, features: FrameFeatures) -> FrameFeatures:
        """A reference is read for its F5 only (motion alignment)."""
        return {"F5": features["F5"]}

    def motion_features(self, target: FrameFeatures, references: list[FrameFeatures]) -> Tensor:
        """M^t: the D-Transformer (or the vanilla transformer) on F5 of t-2, t-1, t; F5^t itself without motion."""
        if self.motion_alignment is None:
            return target["F5"]
        if len(references) != self.num_frames - 1:
            raise ConfigError(
                f"MSAF's motion alignment reads {self.num_frames - 1} reference frames (model.offsets), got "
                f"{len(references)}: it cannot predict a target from its own frame alone"
            )
        return self.motion_alignment([r["F5"] for r in references] + [target["F5"]])

    def pixel_descriptors(self, target: FrameFeatures, m: Tensor) -> Tensor:
        """P: two convs on MHSA_sta(F3, F4, F5, M) (eq. 9), or on their concatenation without the state branch."""
        size = m.shape[-2:]
        stages = [resize(target[s], size) for s in STAGES] + [m]
        fused = self.state_alignment(stages) if self.state_alignment is not None else torch.cat(stages, 1)
        return self.pixel_descriptor(fused)

    def aggregate(self, target: FrameFeatures, references: list[FrameFeatures]) -> dict[str, Tensor]:
        """Target logits at F5's size, plus the soft mask M^t' and the pixel-descriptor logits for the losses (at
        inference only where the logits read them)."""
        m = self.motion_features(target, references)
        soft_mask = self.soft_mask(m)
        out = {"soft_mask": soft_mask}
        if self.pixel_branch:
            p = self.pixel_descriptors(target, m)
            if not self.semantics or self.wants_training_outputs():  # with semantics only L_pd reads it
                out["pixel_logits"] = self.pixel_classifier(p)
        if self.semantics:
            out["logits"] = assignment_logits(p, region_descriptors(m, soft_mask), self.scale)
        elif self.pixel_branch and self.mask_average == "logits":
            out["logits"] = 0.5 * (soft_mask + out["pixel_logits"])
        elif self.pixel_branch:
            out["logits"] = (0.5 * (soft_mask.softmax(1) + out["pixel_logits"].softmax(1))).log()
        else:
            out["logits"] = soft_mask
        return out

    def losses(self, outputs: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """L_pd (eq. 10), L_rd (eq. 12) and L_M (eq. 14), each weighted; the module sums them (eq. 15)."""
        target = labels[:, -1]
        terms = {"L_rd": outputs["soft_mask"]}
        if "pixel_logits" in outputs:
            terms["L_pd"] = outputs["pixel_logits"]
        if self.semantics:
            terms["L_M"] = outputs["logits"]
        return {k: self.weights[k] * cross_entropy(v, target, self.avg_non_ignore) for k, v in sorted(terms.items())}
