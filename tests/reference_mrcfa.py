"""Independent re-implementation of the official MRCFA decode head, with the official module layout and key names.

Used only by the tests as the checkpoint-import oracle. The module tree (and so every ``state_dict`` key)
and the forward computation follow ``SegFormerHead_clips2_resize_1_8_hypercorrelation2_topk_ensemble4`` and
``hypercorre_topk2`` / ``HPNLearner_topk2`` of GuoleiSun/VSS-MRCFA (mmseg 0.11 fork), written here without
mmcv/mmseg: ConvModule = conv (no bias) + BN + ReLU, ``resize`` = ``F.interpolate``. Token selection uses
the official boolean-mask indexing (reference tokens kept in raster order). Names in the official code:
the *reference* frames are its ``query_frame`` and the *target* its ``supp_frame``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """Linear embedding of a feature map into tokens (official ``MLP.proj``)."""

    def __init__(self, input_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(N,C,H,W) -> (N,HW,E)."""
        return self.proj(x.flatten(2).transpose(1, 2))


class ConvModule(nn.Module):
    """mmcv ConvModule(k=1) with BN: keys ``conv.weight`` and ``bn.*``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


class CenterPivotConv4dHalf(nn.Module):
    """The official ``CenterPivotConv4d_half``: only its 2D conv over the target grid, named ``conv2``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel, stride=1, padding=kernel // 2, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(x)


def building_block(in_channels: int, out_channels: list[int], kernels: list[int]) -> nn.Sequential:
    """``make_building_block``: [CenterPivotConv4d_half, GroupNorm(1), ReLU] per unit, flattened."""
    layers: list[nn.Module] = []
    for out, k in zip(out_channels, kernels, strict=True):
        layers += [CenterPivotConv4dHalf(in_channels, out, k), nn.GroupNorm(1, out), nn.ReLU(inplace=True)]
        in_channels = out
    return nn.Sequential(*layers)


class HPNLearnerTopk2(nn.Module):
    """Affinity decoder: encoder_layer4/3/2 (per scale) and encoder_layer4to3/3to2 (deep-to-shallow mixing)."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        if backbone == "b1":
            self.encoder_layer4 = building_block(1, [1, 2], [3, 3])
            self.encoder_layer3 = building_block(1, [1, 2], [3, 3])
            self.encoder_layer2 = building_block(1, [1, 2], [5, 3])
            self.encoder_layer4to3 = building_block(2, [2, 2], [3, 3])
            self.encoder_layer3to2 = building_block(2, [2, 1], [3, 3])
        else:
            self.encoder_layer4 = building_block(1, [1], [3])
            self.encoder_layer3 = building_block(1, [1], [5])
            self.encoder_layer2 = building_block(1, [1], [5])
            self.encoder_layer4to3 = building_block(1, [1], [3])
            self.encoder_layer3to2 = building_block(1, [1], [3])

    @staticmethod
    def _up(x: Tensor, size: torch.Size) -> Tensor:
        return F.interpolate(x, size, mode="bilinear", align_corners=True)

    def forward(self, pyramid: list[Tensor]) -> Tensor:
        """``pyramid`` = [A 1/32, A 1/16, A 1/8], each (B*R*S, 1, h, w)."""
        a4 = self.encoder_layer4(pyramid[0])
        a3 = self.encoder_layer3(pyramid[1])
        a2 = self.encoder_layer2(pyramid[2])
        mixed = self.encoder_layer4to3(self._up(a4, a3.shape[-2:]) + a3)
        return self.encoder_layer3to2(self._up(mixed, a2.shape[-2:]) + a2)


class HyperCorreTopk2(nn.Module):
    """Cross-frame affinities at 1/32, 1/16, 1/8 with the shared top-k token mask, then the HPN learner."""

    def __init__(self, dim: list[int], backbone: str) -> None:
        super().__init__()
        self.q1, self.q2, self.q3 = (nn.Linear(dim[i], dim[i]) for i in (1, 2, 3))
        self.k1, self.k2, self.k3 = (nn.Linear(dim[i], dim[i]) for i in (1, 2, 3))
        self.hpn = HPNLearnerTopk2(backbone)
        self.k_top = 5
        self.threh = 0.8 if backbone == "b0" else 0.5

    def forward(self, refs: list[Tensor], target: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``refs``: [c2 reduced, c3 reduced, c4] (B,R,C,h32,w32); ``target``: [c2, c3, c4] (B,1,C,h,w).

        Returns the refined affinity (B,R,HW8,s) and the token mask (B,R,N) (bool).
        """
        keys, queries, shapes = [], [], []
        for feat, k in zip(refs[::-1], (self.k3, self.k2, self.k1), strict=True):  # deep to shallow
            b, r, c, h, w = feat.shape
            keys.append(k(feat.permute(0, 1, 3, 4, 2)).reshape(b, r, h * w, c))
        for feat, q in zip(target[::-1], (self.q3, self.q2, self.q1), strict=True):
            b, one, c, h, w = feat.shape
            queries.append(q(feat.permute(0, 1, 3, 4, 2)).reshape(b, one, h * w, c))
            shapes.append((h, w))
        b, r = keys[0].shape[:2]
        maps, mask = [], None
        for i in range(3):
            hx, wx = shapes[i]
            if i == 0:
                full = torch.matmul(queries[0], keys[0].transpose(2, 3))  # (B,R,HWt,N)
                importance = torch.topk(full, self.k_top, dim=2)[0].sum(2)  # (B,R,N)
                s = int(full.shape[-1] * self.threh)
                chosen = torch.topk(importance, s, dim=2)[1]
                mask = torch.zeros_like(importance).scatter(2, chosen, 1)
                atten = full[mask.unsqueeze(2).expand_as(full) > 0.5].reshape(b, r, hx * wx, s)
            else:
                assert mask is not None
                c = keys[i].shape[-1]
                selected = keys[i][mask > 0.5].reshape(b, r, -1, c)
                atten = torch.matmul(queries[i], selected.transpose(2, 3))
            s = atten.shape[3]
            maps.append(atten.permute(0, 1, 3, 2).reshape(b * r * s, 1, hx, wx))
        assert mask is not None
        refined = self.hpn(maps)
        h8, w8 = shapes[2]
        return refined.squeeze(1).reshape(b, r, s, h8 * w8).permute(0, 1, 3, 2), mask > 0.5


class SmallDecoder2(nn.Module):
    """``small_decoder2``: ``smalldecoder`` = Sequential(Dropout2d, Conv1x1)."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.smalldecoder = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(embed_dim, num_classes, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.smalldecoder(x)


class OfficialMRCFAHead(nn.Module):
    """The official MRCFA decode head (``decode_head.*`` keys), ``num_clips = 4``."""

    def __init__(
        self, in_channels: list[int], num_classes: int, backbone: str = "b1", embed_dim: int = 256, channels: int = 128
    ) -> None:
        super().__init__()
        self.num_clips = 4
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)  # BaseDecodeHead_clips; never used
        self.dropout = nn.Dropout2d(0.1)
        self.linear_c4 = MLP(in_channels[3], embed_dim)
        self.linear_c3 = MLP(in_channels[2], embed_dim)
        self.linear_c2 = MLP(in_channels[1], embed_dim)
        self.linear_c1 = MLP(in_channels[0], embed_dim)
        self.linear_fuse = ConvModule(4 * embed_dim, embed_dim)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)
        self.deco1, self.deco2, self.deco3, self.deco4 = (SmallDecoder2(embed_dim, num_classes) for _ in range(4))
        self.hypercorre_module = HyperCorreTopk2(in_channels, backbone)
        self.sr2 = nn.Conv2d(in_channels[1], in_channels[1], kernel_size=4, stride=4)
        self.sr3 = nn.Conv2d(in_channels[2], in_channels[2], kernel_size=2, stride=2)
        self.sr1_feat = nn.Conv2d(embed_dim, embed_dim, kernel_size=4, stride=4)

    @staticmethod
    def _resize(x: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, inputs: list[Tensor], batch_size: int, num_clips: int) -> Tensor:
        """Backbone features of B*T frames (b0t0..b0t3, b1t0, ...) -> eval output ``out4`` (B,C,H/4,W/4)."""
        c1, c2, c3, c4 = inputs
        n, size = c4.shape[0], c1.shape[2:]
        parts = []
        for feat, mlp in ((c4, self.linear_c4), (c3, self.linear_c3), (c2, self.linear_c2), (c1, self.linear_c1)):
            e = mlp(feat).permute(0, 2, 1).reshape(n, -1, feat.shape[2], feat.shape[3])
            parts.append(self._resize(e, size) if feat is not c1 else e)
        _c = self.linear_fuse(torch.cat(parts, dim=1))
        h, w = _c.shape[-2:]
        x = self.linear_pred(self.dropout(_c)).reshape(batch_size, num_clips, -1, h, w)
        if not self.training and num_clips != self.num_clips:
            return x[:, -1]

        def clips(t: Tensor) -> Tensor:
            return t.reshape(batch_size, num_clips, -1, t.shape[-2], t.shape[-1])

        c2, c3, c4 = clips(c2), clips(c3), clips(c4)
        r = num_clips - 1
        ref2 = self.sr2(c2[:, :-1].reshape(batch_size * r, -1, c2.shape[-2], c2.shape[-1]))
        ref3 = self.sr3(c3[:, :-1].reshape(batch_size * r, -1, c3.shape[-2], c3.shape[-1]))
        refs = [t.reshape(batch_size, r, -1, t.shape[-2], t.shape[-1]) for t in (ref2, ref3, c4[:, :-1])]
        atten, mask = self.hypercorre_module(refs, [c2[:, -1:], c3[:, -1:], c4[:, -1:]])
        atten = F.softmax(atten, dim=-1)

        h2, w2 = int(h / 2), int(w / 2)
        _c2 = self._resize(_c, (h2, w2))
        own = _c2.reshape(batch_size, num_clips, -1, h2, w2)[:, -1]
        values = self.sr1_feat(_c2)
        values = values.reshape(batch_size, num_clips, -1, values.shape[-2] * values.shape[-1]).transpose(-2, -1)
        values = values[:, :-1][mask].reshape(batch_size, r, -1, values.shape[-1])
        feats = torch.matmul(atten, values).transpose(-2, -1).reshape(batch_size, r, -1, h2, w2)
        outs = [feats[:, i] for i in range(r)] + [own]
        out4 = self._resize(self.deco4((outs[0] + outs[1] + outs[2]) / 3.0 + outs[3]), (h, w))
        if not self.training:
            return out4
        aux = [self._resize(d(o), (h, w)) for d, o in zip((self.deco1, self.deco2, self.deco3), outs[:3], strict=True)]
        return torch.stack([*x.unbind(1), *aux, out4], dim=1)
