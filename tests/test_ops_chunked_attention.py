"""MSAF's target-only and chunked block layouts (vss.models.ops.chunked_attention) are the blocks over whole
sequences: the same outputs (and, for the target-only block, in training too)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from random_weights import randomize_
from test_ops_folded_decoder import gen
from vss.models.aggregators.msaf import _block, _init_transformer, _per_pixel, _per_pixel_last, _spatial
from vss.models.ops import chunked_attention
from vss.models.ops.chunked_attention import per_pixel_chunked, spatial_chunked, tail_block


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_tail_block_is_the_blocks_last_tokens(training: bool, k: int) -> None:
    torch.manual_seed(0)
    block = _block(32, 4, 4.0).train(training)
    _init_transformer(block)
    x = torch.randn(40, 5, 32, generator=gen(5))
    torch.testing.assert_close(tail_block(block, x, k), block(x)[:, -k:], rtol=1e-5, atol=1e-5)


def random_block(dim: int = 32, seed: int = 0) -> nn.Module:
    return randomize_(_block(dim, 4, 4.0), seed)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_chunked_per_pixel_blocks_equal_the_whole_map_ones(monkeypatch, layout: str) -> None:
    """MHSA_sta / MHSA_tem over chunks of 7 / 9 pixels (cutting rows and the batch) equal the one-call formulation;
    the output is channels-last (its storage is the token layout)."""
    monkeypatch.setattr(chunked_attention, "PIXEL_TOKENS", 28)
    block = random_block()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    maps = [torch.randn(2, 32, 5, 6, generator=gen(20 + i)).contiguous(memory_format=fmt) for i in range(4)]
    embed = torch.randn(1, 4, 32, generator=gen(30))
    with torch.no_grad():
        full = per_pixel_chunked(block, maps, embed)
        last = per_pixel_chunked(block, maps[:3], embed[:, :3], tail=1)
        expected_full = _per_pixel(block, maps, embed).flatten(1, 2)
        expected_last = _per_pixel_last(block, maps[:3], embed[:, :3])
    torch.testing.assert_close(full, expected_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, expected_last, rtol=1e-5, atol=1e-5)
    assert full.shape == (2, 128, 5, 6) and full.is_contiguous(memory_format=torch.channels_last)
    assert last.shape == (2, 32, 5, 6) and last.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("size", [(5, 6), (8, 8), (1, 3)])
def test_chunked_spatial_block_equals_the_block(monkeypatch, size: tuple[int, int]) -> None:
    """MHSA_spa with its token-wise parts in chunks of 7 tokens, around one attention over all tokens."""
    monkeypatch.setattr(chunked_attention, "TOKEN_CHUNK", 7)
    block = random_block(seed=2)
    x = torch.randn(2, 32, *size, generator=gen(21))
    with torch.no_grad():
        got = spatial_chunked(block, x)
        expected = _spatial(block, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)
