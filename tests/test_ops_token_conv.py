"""The shared-token conv (vss.models.ops.token_conv) is the grouped convolution with the kernel repeated per token."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from random_weights import randomize_
from test_ops_folded_decoder import gen
from vss.models.ops.token_conv import shared_token_conv

CONV_SHAPES = [(1, 1, 5), (1, 2, 3), (2, 2, 3), (2, 1, 3), (3, 3, 3), (2, 3, 3)]
"""(C_in, C_out, kernel): the SAR/MAA units' shapes, the general diagonal case (3, 3) and (2, 3), which has no
depthwise form (the grouped convolution)."""


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shared_token_conv_is_the_grouped_conv_with_the_same_gradients(
    shape: tuple[int, int, int], layout: str, bias: bool
) -> None:
    c_in, c_out, kernel = shape
    tokens = 5
    conv = randomize_(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=bias), seed=sum(shape))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, tokens * c_in, 6, 9, generator=gen(13)).contiguous(memory_format=fmt).requires_grad_()
    got = shared_token_conv(x, conv, tokens)
    b = conv.bias.repeat(tokens) if bias else None
    expected = F.conv2d(x, conv.weight.repeat(tokens, 1, 1, 1), b, padding=conv.padding, groups=tokens)
    assert got.shape == (2, tokens * c_out, 6, 9)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if layout == "channels_last":  # what MRCFA passes: the units keep the layout they run fastest in
        assert got.is_contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(got.shape, generator=gen(14))
    inputs = [x, *conv.parameters()]
    grads = torch.autograd.grad(got, inputs, upstream)
    names = ["x", "weight", "bias"][: len(inputs)]
    for name, a, e in zip(names, grads, torch.autograd.grad(expected, inputs, upstream), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"d/d{n}: {m}")


def test_shared_token_conv_refuses_a_strided_or_dilated_conv() -> None:
    x = torch.randn(1, 6, 8, 8)
    for conv in (
        nn.Conv2d(2, 2, 3, stride=2),
        nn.Conv2d(2, 2, 3, dilation=2),
        nn.Conv2d(2, 2, 3, padding_mode="reflect"),
    ):
        with pytest.raises(ValueError, match="plain stride-1 convolution"):
            shared_token_conv(x, conv, 3)
