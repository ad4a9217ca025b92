""":class:`vss.models.streams.Streams`: independent streams batched (staggered starts, idle slots, a reset while the
others run, a flush per stream) == each video alone through the lockstep :class:`Step`, for MRCFA (official start:
per-frame-alone frames and a start table), STF (lookahead 1, a flush) and SegFormer (single frame); and the
traced form (``static_branches``: both branches and ``torch.where``, as a CUDA graph captures it) == eager."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from battery import build
from random_weights import randomize_
from test_contract import SIZE, frames
from vss.models.aggregators.base import class_map
from vss.models.segmenter import Segmenter
from vss.models.step import Step, static_branches
from vss.models.streams import Streams

ATOL = 1e-5  # batched vs alone: the same arithmetic on other batch sizes (fp32)
MODELS = {"mrcfa": ("mrcfa", "mit_b0"), "stf": ("stf", "resnet18"), "segformer": ("segformer", "mit_b0")}

# slot -> [(first tick, frames)] : videos one after another in a slot; a slot is idle between and around them.
# Slot 2's first video ends (flush) and a new one starts at the next tick while slots 0 and 1 run.
SCHEDULE = {0: [(0, 13)], 1: [(2, 10)], 2: [(1, 4), (5, 9)]}
TICKS = 15


def alone(step: Step, video: Tensor) -> list[Tensor]:
    """Logits (C,h,w) of every frame of ``video`` (N,3,H,W) alone (batch 1) through the lockstep step, in order."""
    state = step.init_state(*SIZE, 1)
    out = []
    for frame in video:
        o, state = step.step(frame[None], state)
        out += [o["logits"][0]] if o["valid"] else []
    out += [o["logits"][0] for o in step.flush(state, *SIZE) if o["valid"]]
    return out


def batched(streams: Streams, videos: dict[tuple[int, int], Tensor]) -> dict[tuple[int, int], list[Tensor]]:
    """Run :data:`SCHEDULE` (``videos[(slot, k)]``: the k-th video of a slot): one batched call per tick, idle slots
    fed noise; each video flushed at its end and its slot reset. Returns each video's logits in frame order."""
    n = len(SCHEDULE)
    state = streams.init_state(*SIZE, n)
    got: dict[tuple[int, int], list[Tensor]] = {key: [] for key in videos}
    noise = torch.Generator().manual_seed(99)
    for tick in range(TICKS):
        batch, active, which = torch.randn(n, 3, *SIZE, generator=noise), torch.zeros(n, dtype=torch.bool), {}
        for slot, runs in SCHEDULE.items():
            for k, (first, length) in enumerate(runs):
                if first <= tick < first + length:
                    batch[slot], active[slot], which[slot] = videos[(slot, k)][tick - first], True, (slot, k)
        out, state = streams.step(batch, state, active)
        assert out["logits"].shape[0] == n and out["valid"].shape == (n,)
        assert not (out["valid"] & ~active).any(), f"tick {tick}: an idle slot gave a valid output"
        for slot, key in which.items():
            if out["valid"][slot]:
                assert int(out["index"][slot]) == len(got[key]), (tick, slot)
                got[key].append(out["logits"][slot])
        for slot, runs in SCHEDULE.items():  # a video's last frame went in: flush it, start the slot afresh
            for k, (first, length) in enumerate(runs):
                if tick == first + length - 1:
                    got[(slot, k)] += [o["logits"][0] for o in streams.flush(state, *SIZE, slot) if o["valid"]]
                    Streams.reset(state, slot)
    return got


def _model(name: str) -> Segmenter:
    return randomize_(build(*MODELS[name])).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_streams_batched_equal_each_stream_alone(name: str) -> None:
    seg = _model(name)
    videos = {
        (slot, k): frames(length, seed=10 * slot + k)
        for slot, runs in SCHEDULE.items()
        for k, (_, length) in enumerate(runs)
    }
    got = batched(Streams(seg), videos)
    step = Step(seg)
    for key, video in videos.items():
        expected = alone(step, video)
        assert len(got[key]) == len(video) == len(expected), (key, len(got[key]), len(video))
        for t, (g, e) in enumerate(zip(got[key], expected, strict=True)):
            err = (g - e).abs().max().item()
            assert err <= ATOL, f"{name} video {key} frame {t}: batched vs alone logits differ by {err:.3g}"
            assert torch.equal(class_map(g[None]), class_map(e[None])), f"{name} video {key} frame {t}: class map"


@pytest.mark.parametrize("name", ["mrcfa", "stf"])
def test_the_traced_form_equals_eager(name: str) -> None:
    """Both branches + ``torch.where`` (what torch.compile, torch.export and a CUDA graph run) == the eager step,
    on streams that mix per-frame-alone and temporal targets in one batch (MRCFA: frames 0-2 alone)."""
    seg, streams = _model(name), Streams(_model(name))
    state = streams.init_state(*SIZE, 2)
    video = torch.stack([frames(6, seed=1), frames(6, seed=2)], 1)
    traced_state = {k: v.clone() for k, v in state.items()}
    for i in range(6):
        active = torch.tensor([True, i >= 2])  # stream 1 starts two frames later
        eager, state = streams.step(video[i], state, active)
        with static_branches():
            traced, traced_state = streams.step(video[i], traced_state, active)
        valid = eager["valid"]
        assert torch.equal(valid, traced["valid"]) and torch.equal(eager["index"], traced["index"])
        assert torch.allclose(eager["logits"][valid], traced["logits"][valid], atol=ATOL), f"{name} frame {i}"
    del seg


def test_reset_restarts_one_slot_and_idle_slots_keep_their_state() -> None:
    streams = Streams(_model("mrcfa"))
    state = streams.init_state(*SIZE, 3)
    for _ in range(4):
        _, state = streams.step(frames(3, seed=4), state, torch.tensor([True, False, True]))
    assert state["count"].tolist() == [4, 0, 4]
    ring = {k: v.clone() for k, v in state.items() if k.startswith("ring.")}
    _, state = streams.step(frames(3, seed=5), state, torch.tensor([False, False, True]))
    assert state["count"].tolist() == [4, 0, 5]
    assert all(torch.equal(state[k][:, :2], v[:, :2]) for k, v in ring.items()), "an idle slot's ring changed"
    Streams.reset(state, 2)
    assert state["count"].tolist() == [4, 0, 0]
    Streams.reset(state, torch.tensor([True, False, False]))
    assert state["count"].tolist() == [0, 0, 0]
