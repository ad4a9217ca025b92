"""The fast paths compute the same function as the official layouts: the 1x1 classifiers as one matmul, SAR/MAA as
grouped (depthwise) convolutions, MSAF's chunked inference layouts in the whole model, the reference cache that keeps
only what ``aggregate`` reads, training-only outputs skipped at inference (and the references' mean retrieved in
one matmul), and the bf16 / ``torch.compile`` options. The kernels' own equivalence tests sit beside them in
``tests/test_ops_*.py`` (vss.models.ops)."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from random_weights import randomize_
from test_mrcfa import TinyEncoder
from test_ops_folded_decoder import gen, random_head
from vss.errors import ConfigError
from vss.models.aggregators import mrcfa as mrcfa_module
from vss.models.aggregators import msaf as msaf_module
from vss.models.aggregators.mrcfa import MRCFA, SAR_LAYOUTS, AffinityRefinement
from vss.models.aggregators.msaf import MSAF
from vss.models.aggregators.segformer import SegFormer
from vss.models.heads import pointwise
from vss.models.ops import chunked_attention
from vss.models.precision import inference_precision
from vss.models.segmenter import Segmenter
from vss.models.streamer import Streamer


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


def test_msaf_inference_layout_gives_the_straightforward_outputs(monkeypatch) -> None:
    """The whole aggregator (trained-looking offsets, several chunks per map) under ``inference_mode`` equals the
    straightforward formulation (what autograd runs), and the chunked layouts run only without autograd."""
    monkeypatch.setattr(chunked_attention, "PIXEL_TOKENS", 200)
    monkeypatch.setattr(chunked_attention, "TOKEN_CHUNK", 60)
    model = tiny_msaf().requires_grad_(False)
    model.aggregator.wants_training_outputs = lambda: False
    clip = torch.randn(2, 3, 3, 80, 96, generator=gen(22))
    calls: list[str] = []
    for name in ("per_pixel_chunked", "spatial_chunked"):
        fn = getattr(msaf_module, name)
        monkeypatch.setattr(msaf_module, name, lambda *a, _f=fn, _n=name, **k: calls.append(_n) or _f(*a, **k))
    with torch.enable_grad():  # autograd on, nothing requires a gradient: the straightforward path, no graph
        expected = model(clip)
    assert calls == []
    with torch.inference_mode():
        got = model(clip)
    assert sorted(set(calls)) == ["per_pixel_chunked", "spatial_chunked"] and len(calls) == 5
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
