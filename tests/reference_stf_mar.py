"""The official ST_Memory networks re-implemented with the official module tree, so that ``state_dict()`` gives the
official key names; the parity and checkpoint-import oracle of the tests (never imported by vss).

Read from jfzhuang/ST_Memory (commit f253c05):

- ``exp/cityscapes/psp50/STF/model/refine.py`` and ``.../MAR/model/refine.py``: ``SegRefine`` holds ``pspnet``
  (mmseg ``EncoderDecoder`` from ``mmsegmentation/configs/pspnet_r50-d8.py``), ``STF`` and, in the MAR stage,
  ``MAR``; ``STF/python/train.py`` saves ``net.module.state_dict()`` of ``DataParallel(SegRefine())`` (its resume
  path strips a ``module.`` prefix) and ``MAR/python/test.py`` loads such a file strictly.
- ``lib/net/transformer.py``: ``STF`` (``encoder``, ``decoder``, ``pe_enc``, ``pe_dec``) and ``MAR``
  (``HEdecoder``, ``memory_key``, ``memory_value``; its layer is built with ``dim_feedforward=dim // 2``, its
  ``mlp_dim`` argument is unused).
- ``lib/net/transformer_block.py``: ``TransformerEncoder``/``TransformerDecoder`` (``layers``, ``norm=None``),
  ``ISA_Block``/``ISA_Block_CA`` (``self_attn_short``, ``self_attn_long``: sequence-first
  ``nn.MultiheadAttention``), ``TransformerEncoderLayer`` (``self_attn``, ``linear1``, ``linear2``, ``norm1``,
  ``norm2``), ``TransformerDecoderLayer`` (``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``,
  ``norm1..3``), ``Attention`` (``to_q``/``to_k``/``to_v``: three bias-free Linear layers each; ``to_out``:
  Linear then Dropout) and ``TransformerHELayer`` (``attn``, ``norm1``, ``linear1``, ``linear2``, ``norm2``).
- the vendored mmseg/mmcv: ``ResNetV1c`` (deep ``stem`` Sequential, ``layer1..4`` of Bottlenecks ``conv1..3``,
  ``bn1..3``, ``downsample.0/1``; strides (1,2,1,1), dilations (1,1,2,4), the first block of a dilated layer at
  half the dilation), ``PSPHead`` (``psp_modules.i.1``, ``bottleneck``: ConvModules ``conv``/``bn``;
  ``conv_seg``), ``FCNHead`` (``convs.0``, ``conv_seg``). SyncBN is BatchNorm2d here (the same tensors; eval).

The tensor layouts of the ISA steps follow ``ISA_Block``'s view/permute sequence; the positional tables are resized
on every call (the official size check compares the frame count with the height, so it always resizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# -- lib/net/transformer_block.py -------------------------------------------------------------------------
def _to_long(x: Tensor, block: tuple[int, int]) -> Tensor:
    """[n,c,t,H,W] -> (t*bh*bw, n*ph*pw, c): one sequence position per (frame, block), one batch row per offset."""
    n, c, t, h, w = x.shape
    ph, pw = block
    bh, bw = h // ph, w // pw
    return x.reshape(n, c, t, bh, ph, bw, pw).permute(2, 3, 5, 0, 4, 6, 1).reshape(t * bh * bw, n * ph * pw, c)


def _long_to_short(y: Tensor, n: int, t: int, h: int, w: int, block: tuple[int, int]) -> Tensor:
    """The long layout -> (t*ph*pw, n*bh*bw, c): one sequence position per (frame, offset), one row per block."""
    ph, pw = block
    bh, bw = h // ph, w // pw
    c = y.shape[-1]
    return y.reshape(t, bh, bw, n, ph, pw, c).permute(0, 4, 5, 3, 1, 2, 6).reshape(t * ph * pw, n * bh * bw, c)


def _from_short(y: Tensor, n: int, t: int, h: int, w: int, block: tuple[int, int]) -> Tensor:
    """The short layout -> [n,c,t,H,W]."""
    ph, pw = block
    bh, bw = h // ph, w // pw
    c = y.shape[-1]
    return y.reshape(t, ph, pw, n, bh, bw, c).permute(3, 6, 0, 4, 1, 5, 2).reshape(n, c, t, h, w)


class ISA_Block(nn.Module):  # noqa: N801 (the official class name)
    """Long-range attention over the block lattice of all frames, then short-range attention within each block;
    ``pos`` is added to the queries and keys of both steps (the target frames' ``pos`` in the short one)."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.1, block_size: tuple[int, int] = (16, 16)) -> None:
        super().__init__()
        self.self_attn_short = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.self_attn_long = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.block_size = tuple(block_size)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, pos_q: Tensor, pos_k: Tensor) -> Tensor:
        """q [n,c,tq,H,W], k/v [n,c,tk,H,W], their positions -> [n,c,tq,H,W]."""
        n, _, t, h, w = q.shape
        blk = self.block_size
        p = _to_long(pos_q, blk)
        y = self.self_attn_long(_to_long(q, blk) + p, _to_long(k, blk) + _to_long(pos_k, blk), _to_long(v, blk))[0]
        y = _long_to_short(y, n, t, h, w, blk)
        p = _long_to_short(p, n, t, h, w, blk)
        return _from_short(self.self_attn_short(y + p, y + p, y)[0], n, t, h, w, blk)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        return self.attend(q, k, v, pos, pos)


class ISA_Block_CA(ISA_Block):  # noqa: N801
    """The decoder's cross-attention: target queries with ``pos_q``, memory keys with ``pos_k``."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pos_q: Tensor, pos_k: Tensor) -> Tensor:  # type: ignore[override]
        return self.attend(q, k, v, pos_q, pos_k)


def _tokens(x: Tensor) -> Tensor:
    """[n,c,t,h,w] -> (n, t*h*w, c)."""
    return x.flatten(2).transpose(1, 2)


def _volume(x: Tensor, shape: torch.Size) -> Tensor:
    """(n, t*h*w, c) -> [n,c,t,h,w] of ``shape``."""
    return x.transpose(1, 2).reshape(shape)


class TransformerEncoderLayer(nn.Module):
    """Post-norm: src = norm1(src + ISA(src)); src = norm2(src + linear2(relu(linear1(src))))."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1, block_size=(16, 16)
    ) -> None:
        super().__init__()
        self.self_attn = ISA_Block(d_model, nhead, dropout=dropout, block_size=block_size)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        x = self.norm1(_tokens(src) + self.dropout1(_tokens(self.self_attn(src, src, src, pos))))
        x = self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))
        return _volume(x, src.shape)


class TransformerDecoderLayer(nn.Module):
    """Post-norm: ISA self-attention of the target (``query_pos``), ISA_Block_CA over the memory, FFN."""

    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1, block_size=(16, 16)
    ) -> None:
        super().__init__()
        self.self_attn = ISA_Block(d_model, nhead, dropout=dropout, block_size=block_size)
        self.multihead_attn = ISA_Block_CA(d_model, nhead, dropout=dropout, block_size=block_size)
        self.block_size = tuple(block_size)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        shape = tgt.shape
        x = self.norm1(_tokens(tgt) + self.dropout1(_tokens(self.self_attn(tgt, tgt, tgt, query_pos))))
        tgt = _volume(x, shape)
        x = self.norm2(x + self.dropout2(_tokens(self.multihead_attn(tgt, memory, memory, query_pos, pos))))
        x = self.norm3(x + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x))))))
        return _volume(x, shape)


class TransformerEncoder(nn.Module):
    """``layers`` (deep copies of one layer), no final norm."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_clone(encoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos=pos)
        return src


class TransformerDecoder(nn.Module):
    """``layers`` (deep copies of one layer), no final norm."""

    def __init__(self, decoder_layer: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_clone(decoder_layer) for _ in range(num_layers))
        self.num_layers = num_layers

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        for layer in self.layers:
            tgt = layer(tgt, memory, pos=pos, query_pos=query_pos)
        return tgt


def _clone(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


class Attention(nn.Module):
    """MAR's single-head attention: bias-free projection stacks, unscaled softmax(q k^T) v, ``to_out``."""

    def __init__(self, dim: int, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()

        def stack() -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(dim, dim, bias=False),
                nn.Linear(dim, dim_head, bias=False),
                nn.Linear(dim_head, dim_head, bias=False),
            )

        self.to_q, self.to_k, self.to_v = stack(), stack(), stack()
        self.to_out = nn.Sequential(nn.Linear(dim_head, dim), nn.Dropout(dropout))

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        attn = torch.einsum("bid,bjd->bij", self.to_q(query), self.to_k(key)).softmax(dim=-1)
        return self.to_out(torch.einsum("bij,bjd->bid", attn, self.to_v(value))), attn


class TransformerHELayer(nn.Module):
    """Pixels [n,c,h,w] attend over the memory; add & norm1; FFN; add & norm2."""

    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        self.attn = Attention(dim=d_model, dim_head=dim_feedforward, dropout=dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = nn.ReLU()

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        n, c, h, w = query.shape
        x = query.flatten(2).transpose(1, 2)
        x = self.norm1(x + self.dropout(self.attn(x, key, value)[0]))
        x = self.norm2(x + self.dropout2(self.linear2(self.dropout1(self.activation(self.linear1(x))))))
        return x.transpose(1, 2).reshape(n, c, h, w)


# -- lib/net/transformer.py -------------------------------------------------------------------------------
class STF(nn.Module):
    """Encoder over the frames t-1, t, t+1; decoder with the raw frame t as query (three frames: ``pe_enc``)."""

    def __init__(
        self, dim: int, depth: int, heads: int, mlp_dim: int, pe_dim: tuple[int, int], block_size=(16, 16)
    ) -> None:
        super().__init__()
        self.encoder = TransformerEncoder(TransformerEncoderLayer(dim, heads, mlp_dim, block_size=block_size), depth)
        self.decoder = TransformerDecoder(TransformerDecoderLayer(dim, heads, mlp_dim, block_size=block_size), depth)
        self.pe_enc = nn.Parameter(torch.rand(1, dim, 3, pe_dim[0], pe_dim[1]))
        self.pe_dec = nn.Parameter(torch.rand(1, dim, 1, pe_dim[0], pe_dim[1]))

    def positions(self, n: int, h: int, w: int) -> tuple[Tensor, Tensor]:
        """``pe_enc`` and ``pe_dec`` resized (trilinear, F.interpolate's default corners) and repeated n times."""
        pe_enc = F.interpolate(self.pe_enc, size=(3, h, w), mode="trilinear")
        pe_dec = F.interpolate(self.pe_dec, size=(1, h, w), mode="trilinear")
        return pe_enc.repeat(n, 1, 1, 1, 1), pe_dec.repeat(n, 1, 1, 1, 1)

    def forward(self, x_enc_0: Tensor, x_enc_1: Tensor, x_enc_2: Tensor) -> Tensor:
        """Three [n,c,1,h,w] features in time order -> the fused frame-1 feature [n,c,h,w]."""
        x_enc = torch.cat([x_enc_0, x_enc_1, x_enc_2], dim=2)
        n, _, _, h, w = x_enc.shape
        pe_enc, pe_dec = self.positions(n, h, w)
        x_enc = self.encoder(x_enc, pos=pe_enc)
        return self.decoder(x_enc_1, x_enc, pos=pe_enc, query_pos=pe_dec).squeeze(2)


class MAR(nn.Module):
    """``MAR(dim, mlp_dim, KL, KH, num_class)``: memory (1, K*num_class, dim); the layer's width is dim // 2."""

    def __init__(self, dim: int, mlp_dim: int, KL: int, KH: int, num_class: int) -> None:  # noqa: N803
        super().__init__()
        self.HEdecoder = TransformerHELayer(d_model=dim, dim_feedforward=dim // 2)
        self.memory_key = nn.Parameter(torch.rand(1, KL * num_class, dim))
        self.memory_value = nn.Parameter(torch.rand(1, KH * num_class, dim))

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        return self.HEdecoder(x, self.memory_key.repeat(n, 1, 1), self.memory_value.repeat(n, 1, 1))


# -- the vendored mmseg PSPNet R50-D8 ---------------------------------------------------------------------
class ConvModule(nn.Module):
    """mmcv ConvModule with a norm: ``conv`` (no bias), ``bn``, ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """mmseg Bottleneck, pytorch style (stride on the 3x3 conv)."""

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetV1c(nn.Module):
    """depth 50: deep stem (3x3 convs 32, 32, 64), max pool, layer1..4; strides (1,2,1,1), dilations (1,1,2,4)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, 1, 1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, 1, 1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (blocks, stride, dilation) in enumerate(zip((3, 4, 6, 3), (1, 2, 1, 1), (1, 1, 2, 4), strict=True)):
            planes = 64 * 2**i
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
            first = dilation // 2 if dilation > 1 else dilation  # contract_dilation
            layer = [Bottleneck(inplanes, planes, stride, first, downsample)]
            layer += [Bottleneck(planes * 4, planes, 1, dilation, None) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            inplanes = planes * 4

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.stem(x))
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs


class PSPHead(nn.Module):
    """mmseg PSPHead on the last feature (``in_index=3``): ``psp_modules``, ``bottleneck``, ``conv_seg``."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, pool_scales=(1, 2, 3, 6)) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)  # BaseDecodeHead's, registered first
        self.dropout = nn.Dropout2d(0.1)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1)) for s in pool_scales
        )
        self.bottleneck = ConvModule(in_channels + len(pool_scales) * channels, channels, 3, padding=1)

    def forward(self, inputs: list[Tensor], return_feat: bool = False) -> Tensor:
        x = inputs[3]
        size = x.shape[2:]
        pyramid = [F.interpolate(m(x), size=size, mode="bilinear", align_corners=False) for m in self.psp_modules]
        feat = self.bottleneck(torch.cat([x, *pyramid], 1))
        return feat if return_feat else self.cls_seg(feat)

    def cls_seg(self, feat: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(feat))


class FCNHead(nn.Module):
    """mmseg FCNHead (the auxiliary head on layer3; never used by ST_Memory): ``convs.0``, ``conv_seg``."""

    def __init__(self, in_channels: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3, padding=1))


class EncoderDecoder(nn.Module):
    """mmseg ``pspnet_r50-d8``: ``backbone``, ``decode_head``, ``auxiliary_head``."""

    def __init__(self, num_classes: int, channels: int = 512, aux_channels: int = 256) -> None:
        super().__init__()
        self.backbone = ResNetV1c()
        self.decode_head = PSPHead(2048, channels, num_classes)
        self.auxiliary_head = FCNHead(1024, aux_channels, num_classes)


# -- exp/cityscapes/psp50/{STF,MAR}/model/refine.py --------------------------------------------------------
class SegRefine(nn.Module):
    """The official network of a stage: ``pspnet`` + ``STF`` (+ ``MAR`` with ``mar=True``); the official
    sizes are ``channels=512, mlp_dim=256, pe_dim=(128, 256), block_size=(16, 16), num_classes=19``."""

    def __init__(
        self,
        num_classes: int = 19,
        mar: bool = False,
        channels: int = 512,
        mlp_dim: int = 256,
        pe_dim: tuple[int, int] = (128, 256),
        block_size: tuple[int, int] = (16, 16),
        depth: int = 1,
        heads: int = 2,
        aux_channels: int = 256,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.pspnet = EncoderDecoder(num_classes, channels, aux_channels)
        self.STF = STF(dim=channels, depth=depth, heads=heads, mlp_dim=mlp_dim, pe_dim=pe_dim, block_size=block_size)
        if mar:
            self.MAR = MAR(dim=channels, mlp_dim=mlp_dim, KL=10, KH=10, num_class=num_classes)
        self.semantic_loss = nn.CrossEntropyLoss(ignore_index=255)

    def feature(self, im: Tensor) -> Tensor:
        """``decode_head(backbone(im), return_feat=True)`` as [n,c,1,h,w]."""
        return self.pspnet.decode_head(self.pspnet.backbone(im), return_feat=True).unsqueeze(2)

    def logits(self, im_list: list[Tensor]) -> Tensor:
        """Frames t-1, t, t+1 -> the logits at 1/8 (``cls_seg`` before the x8 upsampling)."""
        fused = self.STF(*[self.feature(im) for im in im_list])
        if hasattr(self, "MAR"):
            fused = self.MAR(fused)
        return self.pspnet.decode_head.cls_seg(fused)

    def forward(self, im_list: list[Tensor]) -> Tensor:
        """The official inference output: the logits upsampled x8 (bilinear)."""
        return F.interpolate(self.logits(im_list), scale_factor=8, mode="bilinear")
