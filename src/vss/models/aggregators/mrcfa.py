"""MRCFA: Mining Relations among Cross-Frame Affinities (Sun et al., ECCV 2022), as the official code computes it.

Per frame (:meth:`MRCFA.encode`, cacheable): the MiT features c1..c4 feed the SegFormer MLP decoder, whose
fused 1/4 feature ``_c`` gives the per-frame logits (computed only where read: a target predicted alone, the
training loss); ``_c`` resized to 1/8 is the frame's own feature
(``feat8``, official ``_c2``) and, after a stride-4 conv to the 1/32 grid, its value tokens. For the
last L stages (c2 1/8, c3 1/16, c4 1/32) the frame gets target queries (eq. 1, on its own grid) and
reference keys (eq. 2, reduced to the 1/32 grid by a conv with kernel = stride, eq. 9).

Temporal (:meth:`MRCFA.aggregate`): cross-frame affinities (eq. 3, raw dot products) between the
target's queries and each reference's keys; Selective Token Masking (sec. 3.4, eqs. 10-11) keeps the
same S reference tokens at every scale; the affinity decoder refines each scale (SAR, eq. 5) and
aggregates deep to shallow (MAA, eq. 6); softmax over S; retrieval of the reference values (eq. 7);
merge (eq. 8) = mean over references + the target's own 1/8 feature; classifier; auxiliary
classifiers on each reference's retrieved feature (training loss only).

Where the paper and the official code (GuoleiSun/VSS-MRCFA) differ, the code is the default and the
paper is a config value: ``merge`` (official: at 1/8 with the target's 1/8 feature; paper eq. 8: the
retrieved features upsampled to 1/4 and added to the target's 1/4 feature) and ``key_order``
(official: reduce c_l by the conv, then project by the linear layer; paper eqs. 2 and 9: project,
then reduce). Ablations are config values too: ``token_ratio`` (stm.p, Table 2), ``num_scales``
(Table 3), ``sar`` / ``maa`` / ``fusion=feature_pyramid`` (Table 4).

Official defaults that depend on the backbone (``token_ratio=None`` / ``sar_layout=None`` pick them from
``encoder_name``): p = 0.8 for MiT-B0, 0.5 otherwise; the SAR/MAA layer layout ``b1`` for MiT-B1 and the
light layout for every other MiT (see :data:`SAR_LAYOUTS`).

Start of a video (``start``, :meth:`MRCFA.references`): ``official`` is the official test rule
(``prepare_test_img2``, offsets [-9,-6,-3] only): frames 0-2 are predicted by the per-frame branch alone,
frames 3-8 read the fixed clips of :data:`OFFICIAL_START_CLIPS`, later frames the offsets; ``clamp``
repeats the first frame for references before it (any offsets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vss.errors import ConfigError
from vss.models.aggregators.base import Aggregator, FrameFeatures, cross_entropy, resize
from vss.models.heads import SegFormerHead, pointwise
from vss.models.ops.token_conv import shared, shared_token_conv

if TYPE_CHECKING:
    from vss.checkpoint import ImportResult

SCALES: tuple[str, ...] = ("s8", "s16", "s32")
"""Affinity scales, shallow to deep: stages c2 (1/8), c3 (1/16), c4 (1/32)."""
_STAGE = {"s8": 1, "s16": 2, "s32": 3}
_STRIDE = {"s8": 8, "s16": 16, "s32": 32}
MIT_STRIDES = (4, 8, 16, 32)

# Affinity-decoder layouts of the official HPNLearner_topk2: per block, its units as (out_channels, kernel).
# "refine" holds the SAR block of each scale (official encoder_layer4/3/2 for s32/s16/s8); "aggregate" the
# MAA block that refines the sum arriving at a scale (encoder_layer4to3 at s16, encoder_layer3to2 at s8).
SAR_LAYOUTS: dict[str, dict[str, dict[str, tuple[tuple[int, int], ...]]]] = {
    "b1": {
        "refine": {"s32": ((1, 3), (2, 3)), "s16": ((1, 3), (2, 3)), "s8": ((1, 5), (2, 3))},
        "aggregate": {"s16": ((2, 3), (2, 3)), "s8": ((2, 3), (1, 3))},
    },
    "light": {
        "refine": {"s32": ((1, 3),), "s16": ((1, 5),), "s8": ((1, 5),)},
        "aggregate": {"s16": ((1, 3),), "s8": ((1, 3),)},
    },
}
#: Official test clips (references, oldest first) of targets 3..8 with offsets [-9,-6,-3]; targets 0-2 read none.
OFFICIAL_START_CLIPS: dict[int, tuple[int, ...]] = {
    3: (0, 1, 2),
    4: (0, 2, 3),
    5: (0, 2, 4),
    6: (0, 2, 4),
    7: (0, 3, 5),
    8: (0, 3, 6),
}
OFFICIAL_OFFSETS = (-9, -6, -3)
STARTS = ("official", "clamp")
FUSIONS = ("affinity", "feature_pyramid")
MERGES = ("official", "paper")
KEY_ORDERS = ("official", "paper")


def official_token_ratio(encoder_name: str | None) -> float:
    """Official STM ratio p: 0.8 for MiT-B0, 0.5 for the other backbones (``hypercorre_topk2.threh``)."""
    return 0.8 if str(encoder_name) == "mit_b0" else 0.5


def official_sar_layout(encoder_name: str | None) -> str:
    """Official affinity-decoder layout: ``b1`` for MiT-B1, ``light`` for B0/B2/B5 (``HPNLearner_topk2``)."""
    return "b1" if str(encoder_name) == "mit_b1" else "light"


def cross_frame_affinity(queries: Tensor, keys: Tensor) -> Tensor:
    """Cross-frame affinities, eq. 3: A = Q K^T, raw dot products (no scaling, no softmax), pixel-major.

    ``queries`` (B,HW_t,C) of the target, ``keys`` (B,R,S,C) of R references -> (B,HW_t,R,S): one bmm of each
    batch item's target pixels against all R*S key rows. Pixel-major, the affinity maps over the target grid are
    channels-last views (:func:`affinity_maps`), the layout the SAR/MAA units run fastest in.
    """
    return torch.bmm(queries, keys.flatten(1, 2).transpose(1, 2)).unflatten(2, keys.shape[1:3])


def _as_map(x: Tensor, grid: Sequence[int]) -> Tensor:
    """Pixel-major features (N,HW,C) -> (N,C,H,W), a channels-last view."""
    return x.unflatten(1, tuple(grid)).permute(0, 3, 1, 2)


def affinity_maps(affinity: Tensor, grid: Sequence[int]) -> Tensor:
    """Pixel-major affinities (B,HW,R,S) -> (B,R*S,H,W): one map per (reference, token), a channels-last view."""
    return _as_map(affinity.flatten(2), grid)


def attention_over_tokens(maps: Tensor, references: int) -> Tensor:
    """Softmax over each reference's S tokens of affinity maps (B,R*S,H,W) -> attention (B,HW,R,S), pixel-major."""
    return F.softmax(maps.permute(0, 2, 3, 1).flatten(1, 2).unflatten(2, (references, -1)), dim=3)


def select_tokens(tokens: Tensor, index: Tensor | None) -> Tensor:
    """Rows (B,R,N,C) of the selected reference tokens ``index`` (B,R,S) -> (B,R,S,C) (C: any row length)."""
    if index is None:
        return tokens
    return torch.gather(tokens, 2, index.unsqueeze(-1).expand(-1, -1, -1, tokens.shape[-1]))


def select_affinities(affinity: Tensor, index: Tensor | None) -> Tensor:
    """Affinities (B,HW,R,N) to the selected reference tokens ``index`` (B,R,S) -> (B,HW,R,S)."""
    if index is None:
        return affinity
    return torch.gather(affinity, 3, index.unsqueeze(1).expand(-1, affinity.shape[1], -1, -1))


def retrieve(attention: Tensor, values: Tensor, per_reference: bool = True) -> Tensor:
    """Feature retrieval, eq. 7: attention (B,HW,R,S) over each reference's S value tokens (B,R,S,C) -> (B,R,HW,C);
    ``per_reference=False``: their mean over the references (B,HW,C), one matmul over all R*S tokens."""
    if per_reference:
        return torch.matmul(attention.transpose(1, 2), values)
    return torch.matmul(attention.flatten(2), values.flatten(1, 2)) / values.shape[1]


def _upsample(x: Tensor, size: Sequence[int]) -> Tensor:
    """MAA's Γ: bilinear, align_corners=True, keeping the maps' channels-last layout (torch's CPU kernel for it is
    about 7x faster than for NCHW at a few hundred maps); the map itself when it already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class SelectiveTokenMasking(nn.Module):
    """Selective Token Masking (sec. 3.4, eqs. 10-11): keep the S = int(p N) most important reference tokens.

    A reference token's importance is the sum of its top-n affinities over the target tokens at the
    deepest scale (n = 5). The selection (per batch item and reference) is shared by every scale and
    by the values. Indices are returned in raster order, as the official boolean mask keeps them.
    ``p = 1`` keeps every token without any selection (``None``). When the target has fewer than n
    tokens (tiny inputs) n is reduced to that number; at least one token is always kept.
    """

    def __init__(self, token_ratio: float, top_n: int = 5) -> None:
        super().__init__()
        if not 0.0 < float(token_ratio) <= 1.0:
            raise ConfigError(f"stm.p (model.token_ratio)={token_ratio!r} is invalid: expected a number in (0, 1]")
        if int(top_n) < 1:
            raise ConfigError(f"stm.top_n (model.top_n)={top_n!r} is invalid: expected a positive integer")
        self.token_ratio = float(token_ratio)
        self.top_n = int(top_n)

    def num_selected(self, num_tokens: int) -> int:
        """S = int(p * N) (official ``int(hy*wy*threh)``), at least 1."""
        return num_tokens if self.token_ratio >= 1.0 else max(1, int(num_tokens * self.token_ratio))

    def importance(self, affinity: Tensor) -> Tensor:
        """Token importance map M, eqs. 10-11: (B,R,HW_t,N) -> (B,R,N)."""
        return affinity.topk(min(self.top_n, affinity.shape[2]), dim=2).values.sum(2)

    def forward(self, affinity: Tensor) -> Tensor | None:
        """Selected reference-token indices (B,R,S), sorted; ``None`` when every token is kept."""
        num_tokens = affinity.shape[-1]
        s = self.num_selected(num_tokens)
        if s >= num_tokens:
            return None
        return self.importance(affinity).topk(s, dim=-1).indices.sort(dim=-1).values

    def extra_repr(self) -> str:
        return f"p={self.token_ratio}, top_n={self.top_n}"


class AffinityRefinement(nn.Sequential):
    """Single-scale Affinity Refinement units (eq. 5): [2D conv over the target grid + GroupNorm(1) + ReLU] x n.

    Each selected reference token's affinity map over the target grid is refined by the same units (the
    weights are shared by tokens and references). Input (N, S*C, H, W): S token maps side by side on the
    channel axis, token-major (channel ``s*C + c``); MRCFA passes the R*S maps of each batch item as one
    channels-last image (N = B). Each unit runs as the grouped convolution ``groups=S`` with the shared kernel
    (:func:`shared_token_conv`, as depthwise convolutions) and a GroupNorm with S groups (GroupNorm(1) of each
    token's map): the official per-map computation (the maps folded into the batch, (N*S, C, H, W)) in a layout
    CPU and GPU kernels handle far better (channels-last depthwise: a 1-channel 5x5 unit 14x, the 2-channel
    units 2-4x faster than the official layout).
    Parameter indices follow the official ``make_building_block`` (conv at 0, 3, ...; GroupNorm at 1, 4, ...).
    """

    def __init__(self, in_channels: int, units: Sequence[tuple[int, int]]) -> None:
        layers: list[nn.Module] = []
        for out_channels, kernel in units:
            layers += [
                nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2),
                nn.GroupNorm(1, out_channels),
                nn.ReLU(inplace=True),
            ]
            in_channels = out_channels
        super().__init__(*layers)
        self.in_channels = self[0].in_channels
        self.out_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        """(N, S*C_in, H, W) -> (N, S*C_out, H, W), S = the number of token maps."""
        tokens = x.shape[1] // self.in_channels
        for i in range(0, len(self), 3):
            conv, norm = self[i], self[i + 1]
            x = shared_token_conv(x, conv, tokens)
            # torch.group_norm: F.group_norm refuses one value per group (a 1x1 map at N = 1), which is GroupNorm's
            # defined case (the output is the bias), as in the official per-map layout
            weight, bias = shared(norm.weight, tokens), shared(norm.bias, tokens)
            x = F.relu(torch.group_norm(x, tokens, weight, bias, norm.eps, torch.backends.cudnn.enabled), True)
        return x


class AffinityDecoder(nn.Module):
    """SAR (eq. 5) on each scale, then Multi-scale Affinity Aggregation (eq. 6) from deep to shallow.

    MAA: B^L = Ā^L; B^l = G(Γ(B^{l+1}) + Ā^l), Γ = bilinear upsampling (align_corners=True). With
    ``sar=False`` the raw affinities enter MAA; with ``maa=False`` the refined affinities are upsampled
    and added without G (the official ``only_sar`` / ``only_cfm`` learners). The output is one affinity
    channel on the 1/8 target grid; with fewer scales (L < 3) the shallowest one in use is upsampled to it.
    The official per-backbone widths apply to the full model (SAR + MAA, L = 3); every ablation uses
    single-channel units with the layout's kernels, as the official ablation learners.
    """

    def __init__(self, scales: Sequence[str], layout: str = "light", sar: bool = True, maa: bool = True) -> None:
        super().__init__()
        if layout not in SAR_LAYOUTS:
            raise ConfigError(f"model.sar_layout={layout!r} is invalid: expected one of {sorted(SAR_LAYOUTS)}")
        self.scales = tuple(scales)
        self.layout, self.sar, self.maa = layout, bool(sar), bool(maa)
        spec = SAR_LAYOUTS[layout]
        full = self.sar and self.maa and len(self.scales) == len(SCALES)

        def units(block: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
            return [(out if full else 1, k) for out, k in block]

        channels = 1
        self.refine = nn.ModuleDict()
        if self.sar:
            for s in self.scales:
                self.refine[s] = AffinityRefinement(1, units(spec["refine"][s]))
            channels = self.refine[self.scales[-1]].out_channels
        self.aggregate = nn.ModuleDict()
        if self.maa:
            for s in reversed(self.scales[:-1]):  # deep to shallow: s16 then s8
                self.aggregate[s] = AffinityRefinement(channels, units(spec["aggregate"][s]))
                channels = self.aggregate[s].out_channels
        if channels != 1:
            raise AssertionError(f"affinity decoder ends with {channels} channels, expected 1")

    def forward(self, affinities: dict[str, Tensor], size: Sequence[int]) -> Tensor:
        """Affinity maps per scale (N, T, H_l, W_l) (T token maps, channels-last from MRCFA) -> refined affinity
        (N, T, H, W) at ``size`` (1/8); see :class:`AffinityRefinement` for the layout."""
        out: Tensor | None = None
        for s in reversed(self.scales):
            a = self.refine[s](affinities[s]) if self.sar else affinities[s]
            if out is None:
                out = a
                continue
            out = _upsample(out, a.shape[-2:]) + a
            if self.maa:
                out = self.aggregate[s](out)
        assert out is not None
        return _upsample(out, size)

    def extra_repr(self) -> str:
        return f"scales={self.scales}, layout={self.layout!r}, sar={self.sar}, maa={self.maa}"


def _classifier(embed_dim: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout2d + 1x1 conv (official ``small_decoder2.smalldecoder``)."""
    return nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(embed_dim, num_classes, 1))


def _classify(classifier: nn.Sequential, x: Tensor) -> Tensor:
    """A :func:`_classifier` on a feature map of either layout -> NCHW logits (the 1x1 conv as one matmul)."""
    return pointwise(classifier[1], classifier[0](x))


class MRCFA(Aggregator):
    """MRCFA head on the four MiT stages (strides 4/8/16/32); see the module docstring."""

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """STM's ratio and top-n: set as ``stm.p`` / ``stm.top_n`` (conf/model/mrcfa/stm.yaml), the one path;
        ``model.token_ratio`` / ``model.top_n`` only read them."""
        from omegaconf import OmegaConf

        for key, read in (("stm.p", "model.token_ratio"), ("stm.top_n", "model.top_n")):
            value, wanted = OmegaConf.select(cfg, read, default=None), OmegaConf.select(cfg, key, default=None)
            if read.split(".")[1] in cfg.model and value != wanted:
                raise ConfigError(f"{read}={value!r} differs from {key}={wanted!r}: set {key}={value} (its one path)")
        ratio, top_n = OmegaConf.select(cfg, "stm.p", default=None), OmegaConf.select(cfg, "stm.top_n", default=5)
        if ratio is not None and not (
            isinstance(ratio, int | float) and not isinstance(ratio, bool) and 0 < ratio <= 1
        ):
            raise ConfigError(f"stm.p={ratio!r} is invalid: expected a token ratio in (0, 1], or null")
        if not (isinstance(top_n, int) and not isinstance(top_n, bool) and top_n > 0):
            raise ConfigError(f"stm.top_n={top_n!r} is invalid: expected a positive integer")

    @classmethod
    def single_frame_baseline(cls, model_cfg: Any) -> Callable[..., Aggregator]:
        """SegFormer with the same decoder width and dropout (the paper's single-frame row)."""
        from vss.models.aggregators.segformer import SegFormer

        return partial(
            SegFormer, embed_dim=int(model_cfg.get("embed_dim", 256)), dropout=float(model_cfg.get("dropout", 0.1))
        )

    @classmethod
    def import_official(cls, state_dict: dict[str, Tensor]) -> ImportResult:
        """The official VSS-MRCFA checkpoint (:func:`import_official_checkpoint`)."""
        return import_official_checkpoint(state_dict)

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        offsets: Sequence[int] = OFFICIAL_OFFSETS,
        start: str = "official",
        token_ratio: float | None = None,
        top_n: int = 5,
        num_scales: int = 3,
        sar: bool = True,
        maa: bool = True,
        sar_layout: str | None = None,
        fusion: str = "affinity",
        merge: str = "official",
        key_order: str = "official",
        embed_dim: int = 256,
        dropout: float = 0.1,
        per_frame_loss_weight: float = 0.5,
        aux_loss: bool = True,
        avg_non_ignore: bool = False,
        compile: bool = False,
        encoder_name: str | None = None,
    ) -> None:
        super().__init__(in_channels, num_classes, offsets, avg_non_ignore, compile)
        self.encoder_name = encoder_name
        if encoder_name is not None and not str(encoder_name).startswith("mit_"):
            raise ConfigError(
                f"model=mrcfa needs a MiT encoder (feature strides {list(MIT_STRIDES)}); encoder.name={encoder_name!r} "
                "is not one (use encoder=mit_b0 ... mit_b5)"
            )
        if len(self.in_channels) != 4:
            raise ConfigError(f"model=mrcfa needs 4 encoder stages, got in_channels={self.in_channels}")
        if int(num_scales) not in (1, 2, 3):
            raise ConfigError(f"model.num_scales={num_scales!r} is invalid: expected 1, 2 or 3")
        for key, value, allowed in (
            ("fusion", fusion, FUSIONS),
            ("merge", merge, MERGES),
            ("key_order", key_order, KEY_ORDERS),
            ("start", start, STARTS),
        ):
            if value not in allowed:
                raise ConfigError(f"model.{key}={value!r} is invalid: expected one of {list(allowed)}")
        if not self.offsets:
            raise ConfigError("model.offsets=[] is invalid for model=mrcfa: expected at least one reference frame")
        if start == "official" and self.offsets != OFFICIAL_OFFSETS:
            raise ConfigError(
                f"model.start=official (the official test clips) needs model.offsets={list(OFFICIAL_OFFSETS)}, got "
                f"{list(self.offsets)}; use model.start=clamp with other offsets"
            )
        if int(embed_dim) < 1:
            raise ConfigError(f"model.embed_dim={embed_dim!r} is invalid: expected a positive integer")
        self.start = start
        if token_ratio is None:
            token_ratio = official_token_ratio(encoder_name)
        if sar_layout is None:
            sar_layout = official_sar_layout(encoder_name)
        self.scales = SCALES[len(SCALES) - int(num_scales) :]
        self.fusion, self.merge, self.key_order = fusion, merge, key_order
        self.num_references = len(self.offsets)
        self.per_frame_loss_weight = float(per_frame_loss_weight)
        self.aux_loss = bool(aux_loss)
        self.embed_dim = int(embed_dim)

        # per-frame branch: SegFormer all-MLP decoder (official linear_c*, linear_fuse, linear_pred)
        self.decode_head = SegFormerHead(self.in_channels, num_classes, embed_dim, dropout)
        # eqs. 1, 2 and 9: target queries, reference keys reduced to the 1/32 grid (official q*/k*, sr2, sr3)
        self.query_proj = nn.ModuleDict({s: nn.Linear(self._ch(s), self._ch(s)) for s in self.scales})
        self.key_proj = nn.ModuleDict({s: nn.Linear(self._ch(s), self._ch(s)) for s in self.scales})
        self.key_reduction = nn.ModuleDict(
            {
                s: nn.Conv2d(self._ch(s), self._ch(s), 32 // _STRIDE[s], 32 // _STRIDE[s])
                for s in self.scales
                if s != "s32"
            }
        )
        # values: the 1/8 fused feature reduced to the 1/32 grid (official sr1_feat)
        self.value_reduction = nn.Conv2d(embed_dim, embed_dim, kernel_size=4, stride=4)
        self.token_masking = SelectiveTokenMasking(token_ratio, top_n)
        self.affinity_decoder = AffinityDecoder(self.scales, sar_layout, sar, maa) if fusion == "affinity" else None
        # classifier on the merged feature (official deco4) and one per reference (deco1..3, training only)
        self.classifier = _classifier(embed_dim, num_classes, dropout)
        self.aux_classifiers = nn.ModuleList(
            _classifier(embed_dim, num_classes, dropout) for _ in range(self.num_references)
        )

    def references(self, t: int, length: int | None) -> list[int]:
        """Start-of-video policy ``start``: official (frames 0-2 alone, the fixed clips for 3-8) or clamp."""
        if self.start == "official" and t < min(OFFICIAL_START_CLIPS):
            return []
        if self.start == "official" and t in OFFICIAL_START_CLIPS:
            return list(OFFICIAL_START_CLIPS[t])
        return super().references(t, length)

    def _ch(self, scale: str) -> int:
        return self.in_channels[_STAGE[scale]]

    # -- per frame ---------------------------------------------------------------------------------
    def encode(self, feats: list[Tensor]) -> FrameFeatures:
        """One frame's fused 1/4 feature, own 1/8 feature, value tokens, queries (eq. 1) and keys (eqs. 2, 9).

        The per-frame logits are not computed here: only a target predicted alone (``aggregate(target, [])``)
        and the training loss read them (:meth:`frame_logits`).
        """
        if len(feats) != 4:
            raise ValueError(f"MRCFA expects the 4 MiT stage outputs, got {len(feats)} feature maps")
        fused = self.decode_head.fuse(feats)  # official _c (1/4)
        h4, w4 = fused.shape[-2:]
        # official _c2 = bilinear resize to half size (align_corners=False), which for an even size is the 2x2 mean
        feat8 = F.avg_pool2d(fused, 2)
        value = self.value_reduction(feat8)
        grids = [tuple(f.shape[-2:]) for f in feats]
        if grids[1:] != [(h4 >> i, w4 >> i) for i in (1, 2, 3)] or tuple(value.shape[-2:]) != grids[3]:
            raise ValueError(
                f"MRCFA needs the MiT strides {list(MIT_STRIDES)} (encoder.name={self.encoder_name!r}) and an input "
                f"size divisible by 32 (data.size_divisor=32, crops of multiples of 32); got feature maps {grids}"
            )
        out: FrameFeatures = {"fused": fused, "feat8": feat8, "value": value.flatten(2).transpose(1, 2)}
        for s in self.scales:
            c = feats[_STAGE[s]]
            out[f"query_{s}"] = self.query_proj[s](c.permute(0, 2, 3, 1))  # (N,H_l,W_l,C_l)
            out[f"key_{s}"] = self._keys(s, c)
        return out

    def _keys(self, scale: str, c: Tensor) -> Tensor:
        """Reference keys on the 1/32 grid (N, H32*W32, C_l): eq. 2 with the token reduction of eq. 9."""
        if scale == "s32":
            return self.key_proj[scale](c.flatten(2).transpose(1, 2))
        reduce = self.key_reduction[scale]
        if self.key_order == "official":  # conv on the features, then the linear projection
            return self.key_proj[scale](reduce(c).flatten(2).transpose(1, 2))
        k = self.key_proj[scale](c.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # paper: project, then reduce
        return reduce(k).flatten(2).transpose(1, 2)

    def frame_logits(self, features: FrameFeatures) -> Tensor:
        """The per-frame branch: SegFormer logits (1/4) of a frame from its fused feature."""
        return self.decode_head.classify(features["fused"])

    def reference_features(self, features: FrameFeatures) -> FrameFeatures:
        """What inference reads of a reference: its keys and value tokens (not its 1/4 and 1/8 maps, queries)."""
        return {k: v for k, v in features.items() if k == "value" or k.startswith("key_")}

    # -- temporal ----------------------------------------------------------------------------------
    def aggregate(self, target: FrameFeatures, references: list[FrameFeatures]) -> dict[str, Tensor]:
        """Target logits from its features and the references' (``offsets`` order); none: the per-frame logits.

        The auxiliary outputs (``aux_logits``, ``frame_logits``) are computed only when the training loss may
        read them (:meth:`Aggregator.wants_training_outputs`).
        """
        if not references:
            return {"logits": self.frame_logits(target)}
        r = len(references)

        def stacked(key: str) -> Tensor:
            return torch.stack([f[key] for f in references], dim=1)

        deep = self.scales[-1]
        grids = {s: tuple(target[f"query_{s}"].shape[1:3]) for s in self.scales}

        def affinity(scale: str, keys: Tensor) -> Tensor:
            return cross_frame_affinity(target[f"query_{scale}"].flatten(1, 2), keys)

        full = affinity(deep, stacked(f"key_{deep}"))  # (B,HW_32,R,N)
        index = self.token_masking(full.transpose(1, 2))  # STM (sec. 3.4): the same tokens at every scale
        affinities: dict[str, Tensor] = {}
        for s in self.scales:
            if s == deep:
                affinities[s] = select_affinities(full, index)
            else:
                affinities[s] = affinity(s, select_tokens(stacked(f"key_{s}"), index))
        values = select_tokens(stacked("value"), index)  # (B,R,S,C)
        size8 = tuple(target["feat8"].shape[-2:])
        maps = {k: affinity_maps(a, grids[k]) for k, a in affinities.items()}  # (B,R*S,H_l,W_l) views
        # each reference's retrieved feature is read only by the auxiliary classifiers (training loss); inference
        # retrieves the mean over references (eq. 8's first term) directly, one matmul over the R*S tokens
        per_reference = self.wants_training_outputs()
        if self.fusion == "affinity":
            retrieved = self._retrieve(maps, values, size8, per_reference)
        else:
            retrieved = self._retrieve_feature_pyramid(maps, values, size8, per_reference)
        mean = retrieved.sum(1) / r if per_reference else retrieved
        outputs = {"logits": self._merge(_as_map(mean, size8), target)}
        if r != len(self.aux_classifiers) and self.training:
            raise ConfigError(
                f"model.offsets has {len(self.aux_classifiers)} reference frames but the clip has {r}: "
                "data.clip.offsets must follow model.offsets"
            )
        if not per_reference:
            return outputs
        size4 = target["fused"].shape[-2:]
        if r == len(self.aux_classifiers):
            aux = [
                resize(_classify(cls, _as_map(retrieved[:, i], size8)), size4)
                for i, cls in enumerate(self.aux_classifiers)
            ]
            outputs["aux_logits"] = torch.stack(aux, dim=1)
        outputs["frame_logits"] = torch.stack([self.frame_logits(f) for f in [*references, target]], dim=1)
        return outputs

    def _retrieve(self, maps: dict[str, Tensor], values: Tensor, size8: tuple[int, int], per_reference: bool) -> Tensor:
        """Affinity decoder (eqs. 5-6), softmax over S per reference, retrieval (eq. 7): (B,R,HW8,C), or with
        ``per_reference=False`` the mean over the references (B,HW8,C)."""
        assert self.affinity_decoder is not None
        refined = self.affinity_decoder(maps, size8)  # (B,R*S,H8,W8), channels-last
        return retrieve(attention_over_tokens(refined, values.shape[1]), values, per_reference)

    def _retrieve_feature_pyramid(
        self, maps: dict[str, Tensor], values: Tensor, size8: tuple[int, int], per_reference: bool
    ) -> Tensor:
        """Table 4 "Feature Pyramid": retrieval (eq. 7) at each scale, the retrieved features merged deep to shallow."""
        b, r, _, c = values.shape
        out: Tensor | None = None
        for k in reversed(self.scales):
            grid = maps[k].shape[-2:]
            o = _as_map(retrieve(attention_over_tokens(maps[k], r), values).flatten(0, 1), grid)  # (B*R,C,H_l,W_l)
            out = o if out is None else _upsample(out, grid) + o
        assert out is not None
        retrieved = (_upsample(out, size8) / len(self.scales)).permute(0, 2, 3, 1).reshape(b, r, -1, c)
        return retrieved if per_reference else retrieved.sum(1) / r

    def _merge(self, mean: Tensor, target: FrameFeatures) -> Tensor:
        """Eq. 8: the references' mean (B,C,H8,W8) + the target's own feature, then the classifier; logits at 1/4."""
        size4 = target["fused"].shape[-2:]
        if self.merge == "official":
            return resize(_classify(self.classifier, mean + target["feat8"]), size4)
        merged = F.interpolate(mean, size=size4, mode="bilinear", align_corners=False) + target["fused"]
        return _classify(self.classifier, merged)

    # -- training ----------------------------------------------------------------------------------
    def losses(self, outputs: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """Official loss: w * CE(per-frame logits of every clip frame, its own label) + mean of CE(aux..., final).

        ``w`` = ``per_frame_loss_weight`` (0.5); the second term averages the auxiliary outputs (one per
        reference) and the final output against the target label (``aux_loss=False``: the final output only).
        CE is mmseg's mean over all pixels, ignored ones included (``avg_non_ignore=False``).
        """
        target = labels[:, -1]
        terms: dict[str, Tensor] = {}
        frame_logits = outputs.get("frame_logits")
        if self.per_frame_loss_weight > 0 and frame_logits is not None:
            if frame_logits.shape[1] != labels.shape[1]:
                raise ValueError(f"per-frame logits of {frame_logits.shape[1]} frames but labels of {labels.shape[1]}")
            ce = cross_entropy(frame_logits.flatten(0, 1), labels.flatten(0, 1), self.avg_non_ignore)
            terms["ce_per_frame"] = self.per_frame_loss_weight * ce
        outs = [outputs["logits"]]
        if self.aux_loss and "aux_logits" in outputs:
            outs = list(outputs["aux_logits"].unbind(1)) + outs
        terms["ce_target"] = torch.stack([cross_entropy(o, target, self.avg_non_ignore) for o in outs]).mean()
        return terms


# -- the official checkpoints ----------------------------------------------------------------------
# The MRCFA key table lives here, beside the model (as timm keeps ``checkpoint_filter_fn`` beside each
# model). ``python -m vss.convert --model mrcfa`` calls :meth:`MRCFA.import_official`
# (the module of conf/model/mrcfa.yaml's ``_target_``). The official ``state_dict`` holds ``backbone.*``
# (SegFormer MiT, renamed to timm PVTv2 by :func:`vss.models.encoders.convert_mit_checkpoint`) and
# ``decode_head.*`` (this head, renamed by :func:`official_head_key`).

#: Official ``decode_head`` names (after the prefix) -> ours (under ``aggregator.``).
_HEAD_RENAMES: tuple[tuple[str, str], ...] = (
    (r"linear_(c[1-4]|fuse|pred)\.(.+)", r"decode_head.linear_\1.\2"),
    (r"deco([1-3])\.smalldecoder\.(.+)", "aux_classifiers.{deco}.{rest}"),
    (r"deco4\.smalldecoder\.(.+)", r"classifier.\1"),
    (r"hypercorre_module\.q1\.(.+)", r"query_proj.s8.\1"),
    (r"hypercorre_module\.q2\.(.+)", r"query_proj.s16.\1"),
    (r"hypercorre_module\.q3\.(.+)", r"query_proj.s32.\1"),
    (r"hypercorre_module\.k1\.(.+)", r"key_proj.s8.\1"),
    (r"hypercorre_module\.k2\.(.+)", r"key_proj.s16.\1"),
    (r"hypercorre_module\.k3\.(.+)", r"key_proj.s32.\1"),
    (r"sr2\.(.+)", r"key_reduction.s8.\1"),
    (r"sr3\.(.+)", r"key_reduction.s16.\1"),
    (r"sr1_feat\.(.+)", r"value_reduction.\1"),
    (r"hypercorre_module\.hpn\.encoder_layer4\.(\d+)\.(?:conv2\.)?(.+)", r"affinity_decoder.refine.s32.\1.\2"),
    (r"hypercorre_module\.hpn\.encoder_layer3\.(\d+)\.(?:conv2\.)?(.+)", r"affinity_decoder.refine.s16.\1.\2"),
    (r"hypercorre_module\.hpn\.encoder_layer2\.(\d+)\.(?:conv2\.)?(.+)", r"affinity_decoder.refine.s8.\1.\2"),
    (r"hypercorre_module\.hpn\.encoder_layer4to3\.(\d+)\.(?:conv2\.)?(.+)", r"affinity_decoder.aggregate.s16.\1.\2"),
    (r"hypercorre_module\.hpn\.encoder_layer3to2\.(\d+)\.(?:conv2\.)?(.+)", r"affinity_decoder.aggregate.s8.\1.\2"),
)
#: Official ``decode_head`` keys left out on purpose: mmseg's base-head classifier, which MRCFA never uses.
DROPPED_HEAD = ("conv_seg.",)
#: Present only in the ``b1`` layout of the affinity decoder (its SAR block at 1/32 has two units).
_B1_LAYOUT_KEY = "hypercorre_module.hpn.encoder_layer4.3.conv2.weight"


def official_head_key(key: str) -> str | None:
    """Our aggregator key for an official ``decode_head`` key (prefix removed); None when unknown."""
    import re

    for pattern, repl in _HEAD_RENAMES:
        m = re.fullmatch(pattern, key)
        if m is None:
            continue
        if "{deco}" in repl:
            return repl.format(deco=int(m[1]) - 1, rest=m[2])
        return m.expand(repl)
    return None


def infer_mit_variant(backbone: dict[str, Tensor]) -> str:
    """The MiT variant (mit_b0..b5) whose embed dims and depths match an official backbone state dict."""
    from vss.models.encoders import MIT_SETTINGS

    dims = tuple(int(backbone[f"patch_embed{i}.proj.weight"].shape[0]) for i in range(1, 5))
    depths = tuple(len({k.split(".")[1] for k in backbone if k.startswith(f"block{i}.")}) for i in range(1, 5))
    for name, s in MIT_SETTINGS.items():
        if tuple(s["embed_dims"]) == dims and tuple(s["depths"]) == depths:
            return name
    raise ConfigError(
        f"backbone with embed dims {dims} and depths {depths} is no MiT variant ({', '.join(MIT_SETTINGS)})"
    )


def infer_sar_layout(head: dict[str, Tensor]) -> str:
    """The affinity-decoder layout (``b1`` or ``light``, :data:`SAR_LAYOUTS`) of an official ``decode_head``."""
    return "b1" if _B1_LAYOUT_KEY in head else "light"


def split_official(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """``backbone.*`` and ``decode_head.*`` (prefixes removed) and the keys with any other prefix."""
    backbone, head, other = {}, {}, []
    for k, v in state_dict.items():
        if k.startswith("backbone."):
            backbone[k[len("backbone.") :]] = v
        elif k.startswith("decode_head."):
            head[k[len("decode_head.") :]] = v
        else:
            other.append(k)
    return backbone, head, other


def convert_official_state_dict(
    state_dict: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, str], list[str], list[str]]:
    """Official MRCFA keys -> Segmenter keys (``encoder.body.*``, ``aggregator.*``).

    Returns the converted tensors, the official name of each converted key, the dropped keys
    (``backbone.head.*``, MiT's ImageNet classifier, and :data:`DROPPED_HEAD`) and the keys that have
    no counterpart.
    """
    from vss.models.encoders import convert_mit_checkpoint

    backbone, head, unknown = split_official(state_dict)
    dropped = [f"backbone.{k}" for k in backbone if k.startswith("head.")]
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for k, v in backbone.items():
        for new, tensor in convert_mit_checkpoint({k: v}).items():
            out[f"encoder.body.{new}"], origin[f"encoder.body.{new}"] = tensor, f"backbone.{k}"
    for k, v in head.items():
        if k.startswith(DROPPED_HEAD):
            dropped.append(f"decode_head.{k}")
            continue
        new = official_head_key(k)
        if new is None:
            unknown.append(f"decode_head.{k}")
        else:
            out[f"aggregator.{new}"], origin[f"aggregator.{new}"] = v, f"decode_head.{k}"
    return out, origin, sorted(dropped), sorted(unknown)


def import_official_checkpoint(state_dict: dict[str, Tensor]) -> ImportResult:
    """An official MRCFA (GuoleiSun/VSS-MRCFA, mmseg) ``state_dict`` -> Segmenter tensors + the config they imply.

    Read from the tensors: the MiT variant (``encoder=mit_bX``), the number of classes (``linear_pred``)
    and the affinity-decoder layout (``model.sar_layout``). The STM ratio p is no weight: pass ``stm.p=``
    to vss.convert (default: the official p of the encoder). The config starts from
    ``experiment=mrcfa_vspw`` unless another experiment is given.
    """
    from vss.checkpoint import ImportResult

    backbone, head, _ = split_official(state_dict)
    if not backbone or not head:
        raise ConfigError("expected an official MRCFA (mmseg) checkpoint with backbone.* and decode_head.* keys")
    encoder = infer_mit_variant(backbone)
    if "linear_pred.weight" not in head:
        raise ConfigError("decode_head.linear_pred.weight is missing (not a SegFormer/MRCFA head)")
    num_classes = int(head["linear_pred.weight"].shape[0])
    converted, origin, dropped, unknown = convert_official_state_dict(state_dict)
    return ImportResult(
        state_dict=converted,
        overrides=[
            "model=mrcfa",
            f"encoder={encoder}",
            f"data.num_classes={num_classes}",
            f"model.sar_layout={infer_sar_layout(head)}",
        ],
        defaults=["experiment=mrcfa_vspw"],
        origin=origin,
        dropped=dropped,
        unknown=unknown,
    )
