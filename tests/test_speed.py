"""The fast paths compute the same function as the official layouts: the folded SegFormer decoder (and its weight
cache), the 1x1 classifiers as one matmul, SAR/MAA as grouped (depthwise) convolutions, MSAF's target-only temporal
block, the reference cache that keeps only what ``aggregate`` reads, training-only outputs skipped at inference
(and the references' mean retrieved in one matmul), and the bf16 / ``torch.compile`` options."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from random_weights import randomize_
from test_mrcfa import TinyEncoder
from vss.errors import ConfigError
from vss.models.aggregators import mrcfa as mrcfa_module
from vss.models.aggregators import msaf as msaf_module
from vss.models.aggregators.mrcfa import MRCFA, SAR_LAYOUTS, AffinityRefinement, shared_token_conv
from vss.models.aggregators.msaf import (
    MSAF,
    _block,
    _init_transformer,
    _per_pixel,
    _per_pixel_chunked,
    _per_pixel_last,
    _spatial,
    _spatial_chunked,
    _tail_block,
)
from vss.models.aggregators.segformer import SegFormer
from vss.models.heads import SegFormerHead, pointwise
from vss.models.precision import inference_precision
from vss.models.segmenter import Segmenter
from vss.models.streamer import Streamer

CHANNELS = [8, 16, 24, 32]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def stage_features(batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """MiT-like stage maps at strides 4..32 of a 64x96 input, channels-last strided as timm returns them."""
    g = gen(seed)
    return [torch.randn(batch, 16 >> i, 24 >> i, c, generator=g).permute(0, 3, 1, 2) for i, c in enumerate(CHANNELS)]


def random_head(seed: int = 0) -> SegFormerHead:
    return randomize_(SegFormerHead(CHANNELS, 5, embed_dim=16), seed)


# -- the folded SegFormer decoder ------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_folded_decoder_is_the_official_fuse_with_the_same_gradients(training: bool) -> None:
    head = random_head().train(training)
    feats = stage_features()
    folded = head.fuse(feats)
    grads_folded = torch.autograd.grad(folded.square().sum(), list(head.parameters()), allow_unused=True)
    if training:  # the official path updates the BN running statistics once more: compare from the same state
        head = random_head().train(True)
    official = head.fuse_unfolded(feats)
    grads_official = torch.autograd.grad(official.square().sum(), list(head.parameters()), allow_unused=True)
    assert (folded - official).abs().max().item() < 1e-5
    assert folded.is_contiguous(memory_format=torch.channels_last)  # BN in training keeps the layout too
    scale = max(g.abs().max() for g in grads_official if g is not None)  # (BN makes some gradients ~0 in training)
    for (name, _), a, b in zip(head.named_parameters(), grads_folded, grads_official, strict=True):
        if b is None:  # linear_pred is not in the fuse
            assert a is None, name
            continue
        assert (a - b).abs().max() <= 1e-5 * scale, name


def test_folded_weights_are_cached_in_eval_and_recomputed_when_the_weights_change() -> None:
    head = random_head(seed=1)
    feats = stage_features()
    with torch.no_grad():
        first = head.fuse(feats)
        cached = head.folded()
        assert head.folded()[0][0] is cached[0][0]  # nothing changed: the cache is reused

        head.load_state_dict(random_head(seed=2).state_dict())  # new weights, same tensors (copied in place)
        assert head.folded()[0][0] is not cached[0][0]
        torch.testing.assert_close(head.fuse(feats), random_head(seed=2).fuse_unfolded(feats))
        assert (head.fuse(feats) - first).abs().max() > 1e-2

    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    head.train()
    head.fuse(feats).square().mean().backward()
    opt.step()  # in-place update of the official parameters
    head.eval()
    with torch.no_grad():
        torch.testing.assert_close(head.fuse(feats), head.fuse_unfolded(feats))
        head.linear_fuse.bn.running_var.mul_(2.0)  # a buffer changes too
        torch.testing.assert_close(head.fuse(feats), head.fuse_unfolded(feats))
        moved = copy.deepcopy(head)  # new storage: recomputed, not shared with the original
        moved.linear_c1.proj.weight.add_(1.0)
        torch.testing.assert_close(moved.fuse(feats), moved.fuse_unfolded(feats))
        torch.testing.assert_close(head.fuse(feats), head.fuse_unfolded(feats))


def test_folded_cache_follows_fused_optimizer_steps_and_batchnorm_training() -> None:
    """Fused AdamW and BatchNorm's running statistics change tensors without bumping their version counters:
    a validation after training steps must not reuse the previous validation's folded weights."""
    head = random_head(seed=4)
    feats = stage_features()
    opt = torch.optim.AdamW(head.parameters(), lr=0.05, fused=True)
    for _ in range(2):  # validate, train a step, validate again (as Lightning does)
        head.eval()
        with torch.no_grad():
            torch.testing.assert_close(head.fuse(feats), head.fuse_unfolded(feats))
        head.train()
        head.fuse(feats).square().mean().backward()
        opt.step()
        opt.zero_grad()
    head.eval()
    with torch.no_grad():
        torch.testing.assert_close(head.fuse(feats), head.fuse_unfolded(feats))
        head.fuse(feats)
        versions = [t._version for t in head._fold_sources()]
    opt.param_groups[0]["lr"] = 0.5
    head.fuse(feats).square().mean().backward()  # an optimizer step with the head in eval mode
    opt.step()
    assert [t._version for t in head._fold_sources()] == versions  # the case the version key misses
    with torch.no_grad():
        torch.testing.assert_close(head.fuse(feats), head.fuse_unfolded(feats))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_pointwise_is_the_1x1_conv_with_nchw_output_and_the_same_gradients(bias: bool, layout: str) -> None:
    conv = randomize_(nn.Conv2d(16, 5, 1, bias=bias), seed=7)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 16, 6, 9, generator=gen(11)).contiguous(memory_format=fmt).requires_grad_()
    got, expected = pointwise(conv, x), conv(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 5, 6, 9) and got.is_contiguous()  # plain NCHW whatever the input's layout
    upstream = torch.randn(got.shape, generator=gen(12))
    inputs = [x, *conv.parameters()]
    grads = torch.autograd.grad(got, inputs, upstream)
    for a, b in zip(grads, torch.autograd.grad(expected, inputs, upstream), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["strided", "contiguous"])
def test_fuse_is_channels_last_and_classify_gives_contiguous_nchw_logits(layout: str) -> None:
    """``fuse`` keeps its maps channels-last (whatever the stage maps' layout); ``classify`` reads that and gives
    the logits as plain NCHW, equal to the official 1x1 ``linear_pred`` on the official fused feature."""
    head = random_head(seed=5)
    feats = stage_features(seed=3)
    if layout == "contiguous":
        feats = [f.contiguous() for f in feats]
    with torch.no_grad():
        fused = head.fuse(feats)
        official = head.fuse_unfolded(feats)
        logits = head.classify(fused)
        expected = head.linear_pred(official)
    assert fused.is_contiguous(memory_format=torch.channels_last) and not fused.is_contiguous()
    torch.testing.assert_close(fused, official, rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, 5, 16, 24) and logits.is_contiguous()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_segformer_checkpoint_keys_stay_official() -> None:
    keys = set(random_head().state_dict())
    assert keys == {
        *(f"linear_c{i}.proj.{p}" for i in range(1, 5) for p in ("weight", "bias")),
        "linear_fuse.conv.weight",
        *(f"linear_fuse.bn.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
        "linear_pred.weight",
        "linear_pred.bias",
    }


# -- SAR / MAA as grouped convolutions ------------------------------------------------------------------------


def per_map(block: AffinityRefinement, x: torch.Tensor) -> torch.Tensor:
    """The official layout: every token map in the batch, (N*S, C, H, W), through the plain Sequential."""
    n, sc, h, w = x.shape
    tokens = sc // block.in_channels
    out = nn.Sequential.forward(block, x.reshape(n * tokens, block.in_channels, h, w))
    return out.reshape(n, tokens * block.out_channels, h, w)


@pytest.mark.parametrize("units", [SAR_LAYOUTS["b1"]["refine"]["s8"], SAR_LAYOUTS["b1"]["aggregate"]["s8"]])
def test_grouped_affinity_refinement_equals_the_per_map_units(units: tuple[tuple[int, int], ...]) -> None:
    torch.manual_seed(0)
    in_channels = 2 if units == SAR_LAYOUTS["b1"]["aggregate"]["s8"] else 1
    block = randomize_(AffinityRefinement(in_channels, units), seed=3)
    x = torch.randn(3, 7 * in_channels, 12, 20, generator=gen(4))
    got = block(x)
    assert got.shape == (3, 7 * block.out_channels, 12, 20)
    torch.testing.assert_close(got, per_map(block, x), rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("units", [((1, 3),), SAR_LAYOUTS["b1"]["refine"]["s32"]])
def test_affinity_refinement_of_a_1x1_map_at_batch_1_is_groupnorms_defined_output(
    units: tuple[tuple[int, int], ...],
) -> None:
    """One value per token map and N = 1 (a 1/32 grid of 1x1, one batch item: how MRCFA passes its maps): each
    GroupNorm(1) of a 1-channel map normalises its single value to 0, so the unit gives relu(its bias), as the
    per-map official layout does (F.group_norm refused this input)."""
    block = randomize_(AffinityRefinement(1, units), seed=8)
    x = torch.randn(1, 3, 1, 1, generator=gen(15))
    got = block(x)
    torch.testing.assert_close(got, per_map(block, x), rtol=1e-5, atol=1e-5)
    if len(units) == 1:
        assert got.shape == (1, 3, 1, 1)
        torch.testing.assert_close(got, F.relu(block[1].bias).expand(1, 3, 1, 1), rtol=1e-5, atol=1e-5)
    model = tiny_mrcfa(**({"sar_layout": "b1"} if len(units) > 1 else {}))
    with torch.no_grad():  # the whole model at 32x32: its 1/32 maps are 1x1
        logits = model(torch.randn(1, 4, 3, 32, 32, generator=gen(16)))["logits"]
    assert logits.shape == (1, 5, 8, 8) and torch.isfinite(logits).all()


# -- MSAF's target-only temporal block ------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_tail_block_is_the_blocks_last_tokens(training: bool, k: int) -> None:
    torch.manual_seed(0)
    block = _block(32, 4, 4.0).train(training)
    _init_transformer(block)
    x = torch.randn(40, 5, 32, generator=gen(5))
    torch.testing.assert_close(_tail_block(block, x, k), block(x)[:, -k:], rtol=1e-5, atol=1e-5)


# -- MSAF's chunked inference layouts ---------------------------------------------------------------------------


def random_block(dim: int = 32, seed: int = 0) -> nn.Module:
    return randomize_(_block(dim, 4, 4.0), seed)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_chunked_per_pixel_blocks_equal_the_whole_map_ones(monkeypatch, layout: str) -> None:
    """MHSA_sta / MHSA_tem over chunks of 7 / 9 pixels (cutting rows and the batch) equal the one-call formulation;
    the output is channels-last (its storage is the token layout)."""
    monkeypatch.setattr(msaf_module, "PIXEL_TOKENS", 28)
    block = random_block()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    maps = [torch.randn(2, 32, 5, 6, generator=gen(20 + i)).contiguous(memory_format=fmt) for i in range(4)]
    embed = torch.randn(1, 4, 32, generator=gen(30))
    with torch.no_grad():
        full = _per_pixel_chunked(block, maps, embed)
        last = _per_pixel_chunked(block, maps[:3], embed[:, :3], tail=1)
        expected_full = _per_pixel(block, maps, embed).flatten(1, 2)
        expected_last = _per_pixel_last(block, maps[:3], embed[:, :3])
    torch.testing.assert_close(full, expected_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, expected_last, rtol=1e-5, atol=1e-5)
    assert full.shape == (2, 128, 5, 6) and full.is_contiguous(memory_format=torch.channels_last)
    assert last.shape == (2, 32, 5, 6) and last.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("size", [(5, 6), (8, 8), (1, 3)])
def test_chunked_spatial_block_equals_the_block(monkeypatch, size: tuple[int, int]) -> None:
    """MHSA_spa with its token-wise parts in chunks of 7 tokens, around one attention over all tokens."""
    monkeypatch.setattr(msaf_module, "TOKEN_CHUNK", 7)
    block = random_block(seed=2)
    x = torch.randn(2, 32, *size, generator=gen(21))
    with torch.no_grad():
        got = _spatial_chunked(block, x)
        expected = _spatial(block, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_msaf_inference_layout_gives_the_straightforward_outputs(monkeypatch) -> None:
    """The whole aggregator (trained-looking offsets, several chunks per map) under ``inference_mode`` equals the
    straightforward formulation (what autograd runs), and the chunked layouts run only without autograd."""
    monkeypatch.setattr(msaf_module, "PIXEL_TOKENS", 200)
    monkeypatch.setattr(msaf_module, "TOKEN_CHUNK", 60)
    model = tiny_msaf().requires_grad_(False)
    model.aggregator.wants_training_outputs = lambda: False
    clip = torch.randn(2, 3, 3, 80, 96, generator=gen(22))
    calls: list[str] = []
    for name in ("_per_pixel_chunked", "_spatial_chunked"):
        fn = getattr(msaf_module, name)
        monkeypatch.setattr(msaf_module, name, lambda *a, _f=fn, _n=name, **k: calls.append(_n) or _f(*a, **k))
    with torch.enable_grad():  # autograd on, nothing requires a gradient: the straightforward path, no graph
        expected = model(clip)
    assert calls == []
    with torch.inference_mode():
        got = model(clip)
    assert sorted(set(calls)) == ["_per_pixel_chunked", "_spatial_chunked"] and len(calls) == 5
    assert got.keys() == expected.keys() == {"logits", "soft_mask"}
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4 * expected[key].abs().max().item())


# -- what inference computes and keeps --------------------------------------------------------------------------


def tiny_mrcfa(**kwargs: object) -> Segmenter:
    torch.manual_seed(0)
    model = Segmenter(TinyEncoder(), partial(MRCFA, token_ratio=0.5, embed_dim=32, **kwargs), 5)
    return randomize_(model, 1)


def tiny_msaf(**kwargs: object) -> Segmenter:
    from vss.models.encoders import build_encoder

    torch.manual_seed(0)
    return randomize_(Segmenter(build_encoder("resnet18"), partial(MSAF, embed_dim=16, num_heads=2, **kwargs), 5), 1)


def test_training_outputs_are_computed_only_when_a_loss_can_read_them() -> None:
    model = tiny_mrcfa()
    clip = torch.randn(1, 4, 3, 64, 64, generator=gen(6))
    with torch.no_grad():
        assert set(model(clip)) == {"logits"}  # eval, no autograd: inference
    assert set(model(clip)) == {"logits", "aux_logits", "frame_logits"}  # autograd records: a loss may follow
    assert set(model.train()(clip)) == {"logits", "aux_logits", "frame_logits"}
    msaf = tiny_msaf()
    clip = torch.randn(1, 3, 3, 32, 32, generator=gen(7))
    with torch.no_grad():
        assert set(msaf(clip)) == {"logits", "soft_mask"}
        assert set(tiny_msaf(semantics=False)(clip)) == {"logits", "soft_mask", "pixel_logits"}  # logits read it
    assert set(msaf(clip)) == {"logits", "soft_mask", "pixel_logits"}


@pytest.mark.parametrize("references", [3, 2])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"sar_layout": "b1"}, {"fusion": "feature_pyramid"}, {"merge": "paper"}],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default",
)
def test_inference_retrieves_the_references_mean_as_the_per_reference_path(
    monkeypatch, kwargs: dict[str, str], references: int
) -> None:
    """In eval mode, ``aggregate`` without autograd (inference: the mean over the references retrieved at once, no
    auxiliary outputs) and with autograd (a loss may follow: each reference's retrieved feature, then their mean)
    give the same logits."""
    model = tiny_mrcfa(**kwargs)
    assert not model.training
    frames = torch.randn(references + 1, 2, 3, 64, 96, generator=gen(17))
    with torch.no_grad():
        feats = [model.encode(f) for f in frames]
    calls: list[bool] = []
    retrieve = mrcfa_module.retrieve
    monkeypatch.setattr(
        mrcfa_module,
        "retrieve",
        lambda a, v, per_reference=True: calls.append(per_reference) or retrieve(a, v, per_reference),
    )
    with torch.no_grad():
        inference = model.aggregator.aggregate(feats[-1], feats[:-1])
    inference_calls, calls[:] = calls[:], []
    with torch.enable_grad():
        training = model.aggregator.aggregate(feats[-1], feats[:-1])
    assert set(inference) == {"logits"}
    assert set(training) == (
        {"logits", "aux_logits", "frame_logits"} if references == 3 else {"logits", "frame_logits"}
    )
    if references == 3:
        assert training["aux_logits"].shape == (2, 3, 5, 16, 24)
    if kwargs.get("fusion") != "feature_pyramid":  # the one-matmul mean at inference, per reference otherwise
        assert inference_calls == [False] and calls == [True]
    assert inference["logits"].shape == (2, 5, 16, 24)
    torch.testing.assert_close(inference["logits"], training["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("build", "kept", "share"),
    [(tiny_mrcfa, {"value", "key_s8", "key_s16", "key_s32"}, 0.05), (tiny_msaf, {"F5"}, 0.34)],
)
def test_stream_keeps_only_what_references_are_read_for(build, kept: set[str], share: float) -> None:
    """A predicted frame keeps its reference features only (MRCFA: keys and values, not the 1/4 and 1/8 maps or
    the queries; MSAF: F5); the predictions are those of the clip path (the contract battery)."""
    model = build()
    video = torch.randn(12, 3, 64, 64, generator=gen(8))
    streamer = Streamer(model, batch_size=1)
    with torch.no_grad():
        for i, frame in enumerate(video):
            streamer.push(frame)
            assert all(set(streamer.cache[j]) == kept for j in streamer.cache if j < streamer.next), i
            full = model.encode(frame[None])
            if i == 11:
                stored = sum(v.numel() for v in streamer.cache[i - 1].values())
                assert stored <= share * sum(v.numel() for v in full.values())
        streamer.end()


# -- bf16 and torch.compile --------------------------------------------------------------------------------------

BF16_MAX_ERROR = 0.2  # bf16 autocast logits within this fraction of the fp32 logits' largest magnitude
BF16_MEAN_ERROR = 0.03  # and on average within this fraction of their mean magnitude
BF16_ARGMAX_AGREEMENT = 0.95  # the class map: at least this fraction of pixels as in fp32
# Measured: CPUs without bf16 kernels max 0.7%, mean 0.3-0.5%; a CPU with AMX/AVX512-bf16 kernels (which round
# differently) max 9.5-10.3%, mean 2.2%, argmax agreement 97.0% for tiny_mrcfa (random weights: many near ties;
# MRCFA's affinities and softmaxes run in bf16), 99.2% for the SegFormer model.


@pytest.mark.parametrize(
    "build", [tiny_mrcfa, lambda: randomize_(Segmenter(TinyEncoder(), partial(SegFormer, embed_dim=32), 5), 1)]
)
def test_bf16_autocast_gives_the_same_argmax(build) -> None:
    model = build()
    clip = torch.randn(2, 1 + len(model.offsets), 3, 64, 96, generator=gen(9))
    cpu = torch.device("cpu")
    with torch.no_grad():
        fp32 = model(clip)["logits"]
        with inference_precision("bf16-mixed", cpu):
            bf16 = model(clip)["logits"]
    assert bf16.dtype == torch.bfloat16
    error = (bf16.float() - fp32).abs()
    assert error.max() <= BF16_MAX_ERROR * fp32.abs().max(), (error.max(), fp32.abs().max())
    assert error.mean() <= BF16_MEAN_ERROR * fp32.abs().mean(), (error.mean(), fp32.abs().mean())
    agreement = (bf16.float().argmax(1) == fp32.argmax(1)).float().mean()
    assert agreement >= BF16_ARGMAX_AGREEMENT, agreement
    with pytest.raises(ConfigError, match=r"trainer.precision='fp8' is invalid"), inference_precision("fp8", cpu):
        pass
    with pytest.raises(ConfigError, match=r"16-mixed needs a GPU"), inference_precision("16-mixed", cpu):
        pass


@pytest.mark.slow
def test_compiled_aggregate_gives_the_same_logits() -> None:
    model = tiny_mrcfa()
    compiled = tiny_mrcfa(compile=True)
    video = torch.randn(12, 3, 64, 64, generator=gen(10))
    with torch.no_grad():
        expected = [o.logits for o in Streamer(model, 1).run(video)]
        got = [o.logits for o in Streamer(compiled, 1).run(video)]
    for a, b in zip(got, expected, strict=True):
        assert (a - b).abs().max().item() < 1e-4
        assert torch.equal(a.argmax(0), b.argmax(0))


def test_compile_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match=r"model.compile='yes' is invalid"):
        tiny_mrcfa(compile="yes")


def test_official_parity_is_unchanged_by_the_folded_decoder() -> None:
    """MRCFA's per-frame branch (folded) is the unfolded SegFormer decoder on the same weights."""
    model = tiny_mrcfa().aggregator
    feats = [torch.randn(2, c, 16 >> i, 16 >> i, generator=gen(i)) for i, c in enumerate(model.in_channels)]
    with torch.no_grad():
        got = model.frame_logits(model.encode(feats))
        expected = model.decode_head.classify(model.decode_head.fuse_unfolded(feats))
    assert got.shape == (2, 5, 16, 16) and (got - expected).abs().max().item() < 1e-5


# -- MiT with channels-last conv weights -------------------------------------------------------------------------


def test_mit_channels_last_weights_compute_the_nchw_function_and_gradients() -> None:
    """The MiT body keeps its conv weights channels-last (its token maps are channels-last views): the same
    outputs and gradients as NCHW weights, the same checkpoint keys, and a loaded checkpoint keeps the layout."""
    from vss.models.encoders import MiTEncoder

    fast = randomize_(MiTEncoder("mit_b0"), seed=5)
    plain = copy.deepcopy(fast).to(memory_format=torch.contiguous_format)
    convs = [m.weight for m in fast.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(
        m.weight.is_contiguous(memory_format=torch.channels_last) for m in plain.modules() if isinstance(m, nn.Conv2d)
    )
    x = torch.randn(2, 3, 64, 96, generator=gen(6))
    outs = [fast(x), plain(x)]
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    loss = [sum(o.square().mean() for o in out) for out in outs]
    grads = [torch.autograd.grad(l, list(m.parameters())) for l, m in zip(loss, (fast, plain), strict=True)]
    for (name, _), a, b in zip(fast.named_parameters(), *grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    reloaded = MiTEncoder("mit_b0")
    reloaded.load_state_dict(plain.state_dict())  # an NCHW checkpoint
    assert all(
        m.weight.is_contiguous(memory_format=torch.channels_last)
        for m in reloaded.modules()
        if isinstance(m, nn.Conv2d)
    )
    assert set(reloaded.state_dict()) == set(plain.state_dict())
