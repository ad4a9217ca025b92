"""The folded SegFormer decoder (vss.models.ops.folded_decoder) is the official fuse: the same outputs and
gradients, a weight cache that follows every change of the weights, and no optimizer hook at import."""

from __future__ import annotations

import copy
import gc
import subprocess
import sys
from functools import partial

import pytest
import torch
from torch.optim.optimizer import _global_optimizer_post_hooks

from random_weights import randomize_
from vss.models.heads import SegFormerHead
from vss.models.ops.folded_decoder import FoldCache, fold_sources

CHANNELS = [8, 16, 24, 32]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def stage_features(batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """MiT-like stage maps at strides 4..32 of a 64x96 input, channels-last strided as timm returns them."""
    g = gen(seed)
    return [torch.randn(batch, 16 >> i, 24 >> i, c, generator=g).permute(0, 3, 1, 2) for i, c in enumerate(CHANNELS)]


def random_head(seed: int = 0) -> SegFormerHead:
    return randomize_(SegFormerHead(CHANNELS, 5, embed_dim=16), seed)


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
        versions = [t._version for t in fold_sources(head)]
    opt.param_groups[0]["lr"] = 0.5
    head.fuse(feats).square().mean().backward()  # an optimizer step with the head in eval mode
    opt.step()
    assert [t._version for t in fold_sources(head)] == versions  # the case the version key misses
    with torch.no_grad():
        torch.testing.assert_close(head.fuse(feats), head.fuse_unfolded(feats))


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


def test_no_optimizer_hook_is_registered_at_import() -> None:
    code = (
        "import vss.models.heads, vss.models.aggregators.mrcfa, vss.models.aggregators.segformer;"
        "from torch.optim.optimizer import _global_optimizer_post_hooks as h; print(len(h))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def _hooks_of(cache: FoldCache) -> int:
    """How many global optimizer step hooks drop this cache's maps."""
    return sum(isinstance(h, partial) and h.args[0]() is cache for h in _global_optimizer_post_hooks.values())


def test_the_cache_holds_an_optimizer_hook_only_while_it_holds_maps() -> None:
    head = random_head(seed=6)
    cache, feats = head._fold_cache, stage_features()
    assert _hooks_of(cache) == 0
    with torch.no_grad():
        head.fuse(feats)
    assert _hooks_of(cache) == 1
    head.train()  # training drops the maps and the hook
    assert _hooks_of(cache) == 0
    head.eval()
    with torch.no_grad():
        head.fuse(feats)
        head.fuse(feats)
    assert _hooks_of(cache) == 1
    (ref,) = [
        h.args[0] for h in _global_optimizer_post_hooks.values() if isinstance(h, partial) and h.args[0]() is cache
    ]
    del head, cache
    gc.collect()  # a collected head leaves no hook behind
    assert ref() is None and not any(
        isinstance(h, partial) and h.args[0] is ref for h in _global_optimizer_post_hooks.values()
    )


def _sgd_step(head: SegFormerHead, fused: bool) -> None:
    opt = torch.optim.AdamW(head.parameters(), lr=0.1, fused=True) if fused else torch.optim.SGD(head.parameters(), 0.5)
    head.fuse(stage_features(seed=9)).square().mean().backward()  # eval mode: no train() call drops the cache
    opt.step()


def _edit_in_place(weight: torch.Tensor) -> None:
    with torch.no_grad():  # (edits through ``.data`` bypass version counters, as they do autograd's checks)
        weight.mul_(-2.0)


CHANGES = {
    "sgd_step": lambda head: _sgd_step(head, fused=False),
    "fused_adamw_step": lambda head: _sgd_step(head, fused=True),
    "load_state_dict": lambda head: head.load_state_dict(random_head(seed=8).state_dict()),
    "in_place_edit": lambda head: _edit_in_place(head.linear_c1.proj.weight),
}


@pytest.mark.parametrize("change", CHANGES)
def test_each_change_of_the_weights_in_eval_mode_invalidates_the_cache(change: str) -> None:
    """The head stays in eval mode throughout: the cached maps are recomputed after the change, and the folded fuse
    equals the unfolded one on the new weights."""
    head = random_head(seed=7)
    feats = stage_features()
    with torch.no_grad():
        before = head.fuse(feats)
        cached = head.folded()
        assert head.folded()[0][0] is cached[0][0]
    CHANGES[change](head)
    with torch.no_grad():
        assert head.folded()[0][0] is not cached[0][0]
        after = head.fuse(feats)
        torch.testing.assert_close(after, head.fuse_unfolded(feats))
    assert (after - before).abs().max() > 1e-3
