"""vss.models.deform: the grid_sample + matmul deformable conv equals torchvision's kernel, values and gradients."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from vss.errors import ConfigError
from vss.models import deform
from vss.models.aggregators.msaf import MSAF
from vss.models.deform import deform_conv2d, deform_conv2d_sampled
from vss.models.encoders import build_encoder
from vss.models.segmenter import Segmenter

TOL = {torch.float64: {"atol": 1e-10, "rtol": 1e-10}, torch.float32: {"atol": 1e-5, "rtol": 1e-5}}

# (input size, kernel, stride, padding, dilation, groups, offset groups, mask, bias)
CASES = {
    "3x3_pad1": ((7, 9), (3, 3), 1, 1, 1, 1, 1, True, True),
    "no_mask_no_bias": ((6, 5), (3, 3), 1, 1, 1, 1, 1, False, False),
    "stride2": ((9, 8), (3, 3), 2, 1, 1, 1, 1, True, True),
    "pad0_dilation2": ((10, 11), (3, 3), 1, 0, 2, 1, 1, True, True),
    "rect_kernel_aniso": ((8, 7), (3, 2), (2, 1), (1, 0), (1, 2), 1, 1, True, True),
    "groups2": ((6, 7), (3, 3), 1, 1, 1, 2, 1, True, True),
    "offset_groups2": ((6, 7), (3, 3), 1, 1, 1, 1, 2, True, True),
    "groups2_offset_groups4": ((5, 6), (3, 3), 1, 2, 1, 2, 4, True, False),
    "1x1_pow2_size": ((8, 16), (1, 1), 1, 0, 1, 1, 1, True, True),
    "5x5_pad2": ((7, 6), (5, 5), 1, 2, 1, 1, 1, True, True),
}


def _out_size(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


def _inputs(case: str, dtype: torch.dtype, offsets: str, seed: int = 0) -> tuple[dict, dict]:
    """Random input, weight, bias, mask and offsets: ``random`` (uniform in [-3, 3], so many taps fall outside
    the map) or ``integer`` (whole pixels in [-3, 3], taps exactly on pixels, on the border and at -1 / size)."""
    (h, w), (kh, kw), stride, padding, dilation, groups, og, use_mask, use_bias = CASES[case]
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    ho, wo = _out_size(h, kh, sh, ph, dh), _out_size(w, kw, sw, pw, dw)
    g = torch.Generator().manual_seed(seed)
    b, cin, cout = 2, 4 * max(groups, og), 2 * groups * 3
    kk = kh * kw
    tensors = {
        "input": torch.randn(b, cin, h, w, generator=g, dtype=dtype),
        "weight": torch.randn(cout, cin // groups, kh, kw, generator=g, dtype=dtype),
        "bias": torch.randn(cout, generator=g, dtype=dtype) if use_bias else None,
        "mask": torch.rand(b, og * kk, ho, wo, generator=g, dtype=dtype) if use_mask else None,
    }
    if offsets == "random":
        off = (torch.rand(b, 2 * og * kk, ho, wo, generator=g, dtype=dtype) * 2 - 1) * 3
    else:
        off = torch.randint(-3, 4, (b, 2 * og * kk, ho, wo), generator=g).to(dtype)
        off[:, :, 0] = 0.0  # zero offsets on the first output row: padded taps at exactly -1 (and the zero init)
    tensors["offset"] = off
    kwargs = {"stride": stride, "padding": padding, "dilation": dilation}
    return tensors, kwargs


def _forward_and_grads(fn, tensors: dict, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """fn's output and the gradients of a fixed random projection of it w.r.t. every tensor argument."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in tensors.items() if v is not None}
    args = {k: leaves.get(k) for k in tensors}
    out = fn(args["input"], args["offset"], args["weight"], args["bias"], mask=args["mask"], **kwargs)
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    grads = torch.autograd.grad((out * proj).sum(), list(leaves.values()))
    return out.detach(), dict(zip(leaves, grads, strict=True))


@pytest.mark.parametrize("offsets", ["random", "integer"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CASES))
def test_sampled_deform_conv_equals_torchvision(case: str, dtype: torch.dtype, offsets: str) -> None:
    tensors, kwargs = _inputs(case, dtype, offsets)
    out_tv, grads_tv = _forward_and_grads(tv_deform_conv2d, tensors, kwargs)
    out, grads = _forward_and_grads(deform_conv2d_sampled, tensors, kwargs)
    tol = TOL[dtype]
    torch.testing.assert_close(out, out_tv, **tol)
    assert grads.keys() == grads_tv.keys()
    for name, grad in grads.items():
        scale = max(grads_tv[name].abs().max().item(), 1.0)  # gradients sum many terms: relative to their size
        torch.testing.assert_close(grad, grads_tv[name], atol=tol["atol"] * scale, rtol=tol["rtol"], msg=name)


def test_taps_outside_the_map_read_zero_and_pass_no_gradient() -> None:
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    # unshifted taps sit at x = -1..6 (padding 1, width 6): these shifts put every tap strictly outside
    for shift in (-7.5, 7.5, 9.5, -20.25):
        off = torch.zeros(1, 18, 5, 6, dtype=torch.float64)
        off[:, 1::2] = shift
        off.requires_grad_(True)
        for fn in (tv_deform_conv2d, deform_conv2d_sampled):
            out = fn(x, off, w, padding=1)
            (grad,) = torch.autograd.grad(out.sum(), off)
            assert out.abs().max() == 0.0 and grad.abs().max() == 0.0, (fn, shift)
    # taps landing exactly on the border (x = -1 or x = width) read zero in both, partly inside taps the same
    for shift in (-7.0, -1.0, 1.0, 0.5):
        off = torch.zeros(1, 18, 5, 6, dtype=torch.float64)
        off[:, 1::2] = shift
        out_tv = tv_deform_conv2d(x, off, w, padding=1)
        torch.testing.assert_close(deform_conv2d_sampled(x, off, w, padding=1), out_tv, atol=1e-12, rtol=0)


def test_impl_dispatch_and_bad_impl() -> None:
    tensors, kwargs = _inputs("3x3_pad1", torch.float32, "random")
    args = (tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"])
    ref = tv_deform_conv2d(*args, mask=tensors["mask"], **kwargs)
    for impl in ("auto", "sampled", "torchvision"):
        torch.testing.assert_close(
            deform_conv2d(*args, mask=tensors["mask"], impl=impl, **kwargs), ref, **TOL[torch.float32]
        )
    with pytest.raises(ConfigError, match="dcn_impl"):
        deform_conv2d(*args, mask=tensors["mask"], impl="cuda", **kwargs)
    with pytest.raises(ConfigError, match="dcn_impl"):
        MSAF([64, 128, 256, 512], 5, dcn_impl="fast")


def test_msaf_gives_the_same_logits_and_gradients_with_either_dcn_impl() -> None:
    """The whole model with trained-looking (non-zero) offsets: dcn_impl=sampled equals dcn_impl=torchvision."""
    small = {"embed_dim": 32, "num_heads": 2, "mlp_ratio": 2.0}
    models = {}
    for impl in ("torchvision", "sampled"):
        torch.manual_seed(0)
        models[impl] = Segmenter(build_encoder("resnet18"), partial(MSAF, dcn_impl=impl, **small), 5).double()
    models["sampled"].load_state_dict(models["torchvision"].state_dict())
    with torch.no_grad():
        for model in models.values():
            for m in model.modules():
                if hasattr(m, "offset") and isinstance(m.offset, torch.nn.Conv2d):
                    g = torch.Generator().manual_seed(3)
                    m.offset.weight.copy_(torch.randn(m.offset.weight.shape, generator=g, dtype=torch.float64))
    clip = torch.randn(1, 3, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = {}
    for impl, model in models.items():
        model.train()
        out = model(clip)
        logits = out if isinstance(out, torch.Tensor) else out["logits"]
        dcn = model.aggregator.motion_alignment.att.dcn
        params = [dcn[0].weight, dcn[0].offset.weight, dcn[1].offset.weight]
        results[impl] = (logits.detach(), torch.autograd.grad(logits.square().mean(), params))
    torch.testing.assert_close(results["sampled"][0], results["torchvision"][0], atol=1e-9, rtol=1e-9)
    for a, b in zip(results["sampled"][1], results["torchvision"][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-9 * max(b.abs().max().item(), 1.0), rtol=1e-8)


@pytest.mark.parametrize("offsets", ["random", "integer"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CASES))
def test_inference_bands_equal_torchvision(monkeypatch, case: str, dtype: torch.dtype, offsets: str) -> None:
    """Without autograd one group / one offset group runs a band of output rows at a time into a channels-last
    output (vss.models.deform._sampled_rows); the bands here are 5 pixels wide, so they cut rows and batches."""
    monkeypatch.setattr(deform, "ROW_PIXELS", 5)
    tensors, kwargs = _inputs(case, dtype, offsets)
    args = (tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"])
    ref = tv_deform_conv2d(*args, mask=tensors["mask"], **kwargs)
    with torch.no_grad():
        out = deform_conv2d_sampled(*args, mask=tensors["mask"], **kwargs)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    _, _, _, _, _, groups, offset_groups, *_ = CASES[case]
    banded = groups == 1 and offset_groups == 1
    assert out.is_contiguous(memory_format=torch.channels_last) == banded
    with torch.inference_mode():  # and the same under inference_mode
        torch.testing.assert_close(deform_conv2d_sampled(*args, mask=tensors["mask"], **kwargs), ref, **TOL[dtype])
