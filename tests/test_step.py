"""The contract battery's step check: step-driven streaming (:class:`vss.models.step.Step`) == :class:`Streamer` ==
the clip path, for every ``conf/model/*.yaml`` x encoder family x variant (the battery's small configs, 64x64).

Two videos advance in lockstep (batch 2) over 14 frames (MRCFA's official start clips, then its steady state),
then ``flush``; the state keeps its names, shapes and dtypes after every call and ``init_state`` is zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from battery import build, combos, supported
from contract import assert_logits_match, clip_path, stream
from random_weights import randomize_
from test_contract import SIZE, VIDEO_FRAMES, build_variant, frames
from vss.errors import ConfigError
from vss.models.aggregators.base import class_map, resize
from vss.models.segmenter import Segmenter
from vss.models.step import State, Step

STEP_ATOL = 1e-5  # step vs Streamer: the same arithmetic on the same batches (fp32)
VARIANTS = ["default", "after_target"]


def _signature(state: State) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(k, tuple(v.shape), v.dtype) for k, v in state.items()]


def run_steps(step: Step, videos: Tensor) -> list[dict[str, Tensor]]:
    """Videos (B,N,3,H,W) in lockstep through ``step`` then ``flush``: the valid outputs, in order. Checks that
    ``init_state`` is zeros and that the state's names, shapes and dtypes never change."""
    b, n = videos.shape[:2]
    h, w = videos.shape[-2:]
    state = step.init_state(h, w, b)
    assert all(not v.any() for v in state.values()), "init_state must give zeros"
    signature = _signature(state)
    out = []
    for i in range(n):
        o, state = step.step(videos[:, i], state)
        assert _signature(state) == signature, f"the state changed shape at frame {i}"
        assert int(state["count"]) == i + 1
        assert bool(o["valid"]) == (i >= step.lookahead), f"frame {i}: valid={bool(o['valid'])}"
        out += [o] if o["valid"] else []
    out += [o for o in step.flush(state, h, w) if o["valid"]]
    assert [int(o["index"]) for o in out] == list(range(n)), [int(o["index"]) for o in out]
    return out


def assert_step_equals_streamer_and_clip(seg: Segmenter, videos: Tensor, label: str) -> None:
    """Each video alone (batch 1, the Streamer's batches) equals the Streamer within :data:`STEP_ATOL` with equal
    class maps, and the clip path as the battery checks it; the videos in lockstep (batch B) equal them alone."""
    step = Step(seg)
    together = run_steps(step, videos)
    for v, video in enumerate(videos):
        alone = run_steps(step, video.unsqueeze(0))
        streamed = stream(seg, video, batch_size=1)
        expected = clip_path(seg, video)
        for o, s, b in zip(alone, streamed, together, strict=True):
            got, t = o["logits"][0], s.index
            ref = resize(s.logits.unsqueeze(0), got.shape[-2:])[0]  # the step's output size (see vss.models.step)
            err = (got - ref).abs().max().item()
            assert err <= STEP_ATOL, f"{label} video {v} frame {t}: step vs Streamer logits differ by {err:.3g}"
            assert torch.equal(class_map(got[None]), class_map(ref[None])), f"{label} video {v} frame {t}: class map"
            assert_logits_match(got, resize(expected[t].unsqueeze(0), got.shape[-2:])[0], f"{label} clip, frame {t}")
            assert_logits_match(b["logits"][v], got, f"{label} video {v} of {len(videos)} in lockstep, frame {t}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("combo", combos())
def test_step_equals_streamer_equals_clip(combo: tuple[str, str], variant: str) -> None:
    if not supported(*combo):
        pytest.skip(f"model={combo[0]} does not support encoder={combo[1]} (ConfigError)")
    seg = randomize_(build_variant(*combo, variant)).eval()
    videos = torch.stack([frames(VIDEO_FRAMES), frames(VIDEO_FRAMES, seed=5)])
    assert_step_equals_streamer_and_clip(seg, videos, f"{combo[0]}-{combo[1]} {variant}")


@pytest.mark.parametrize("length", [1, 2, 3])
@pytest.mark.parametrize("combo", [("mrcfa", "mit_b0"), ("stf", "resnet18")], ids=["mrcfa", "stf"])
def test_short_videos_with_lookahead_flush_every_frame(combo: tuple[str, str], length: int) -> None:
    seg = randomize_(build_variant(*combo, "after_target")).eval()
    assert_step_equals_streamer_and_clip(seg, frames(length, seed=7).unsqueeze(0), f"{combo[0]} length {length}")


def test_mrcfa_official_start_is_tabulated_as_its_clips() -> None:
    step = Step(build("mrcfa", "mit_b0").eval())
    assert (step.start_frames, step.span, step.slots, step.pending_slots) == (9, 9, 10, 1)
    assert step.start_alone.tolist() == [True] * 3 + [False] * 6
    clips = [[0, 1, 2], [0, 2, 3], [0, 2, 4], [0, 2, 4], [0, 3, 5], [0, 3, 6]]
    assert step.start_table[3:].tolist() == clips
    state = step.init_state(*SIZE, batch=1)
    # MRCFA-B0 reads keys at 1/8, 1/16, 1/32 and the value tokens; nothing pending (causal)
    assert sorted(state) == ["count", "ring.key_s16", "ring.key_s32", "ring.key_s8", "ring.value"]
    assert all(v.shape[:2] == (10, 1) for k, v in state.items() if k != "count")
    assert step.layout(*SIZE).logits == (5, 16, 16)  # per-frame and temporal logits both at 1/4: no resize


def test_clamped_offsets_need_no_table() -> None:
    step = Step(build_variant("stf", "resnet18", "after_target").eval())
    assert (step.start_frames, step.span, step.slots, step.pending_slots) == (0, 2, 4, 2)
    assert step.layout(*SIZE).logits[1:] == (8, 8)  # one branch: the model's own size (1/8)


@dataclass
class _Policy:
    """A stand-in model with a given start policy (Step reads only offsets, lookahead and references here)."""

    offsets: tuple[int, ...]
    rule: object

    @property
    def lookahead(self) -> int:
        return max((0, *self.offsets))

    def references(self, t: int, length: int | None) -> list[int]:
        return self.rule(t, length)


def test_policies_without_a_fixed_shape_form_are_refused() -> None:
    def steady(t: int) -> list[int]:
        return [max(0, t - 2), max(0, t - 1)]

    cases = {
        "1 reference": _Policy((-2, -1), lambda t, n: [0] if t == 1 else steady(t)),
        "does not settle": _Policy((-2, -1), lambda t, n: [] if t % 2 else steady(t)),
        "past its lookahead": _Policy((-1,), lambda t, n: [t + 1] if t == 5 else [max(0, t - 1)]),
        "not the tabulated": _Policy((-1, 1), lambda t, n: [max(0, t - 1), t + 1]),  # no end clamp
    }
    for words, model in cases.items():
        with pytest.raises(ConfigError, match=words):
            Step(model)  # type: ignore[arg-type]
