"""Milliseconds of each part of an MRCFA-B1 streaming step, and of SegFormer-B1's:
``python experiments/speed_parts.py [H W] [--calls N]`` (default 256 448).

Builds both models as experiments/speed_worker.py does (random weights, eval, 124 classes) from whichever ``vss``
is on the path, with glibc's allocator set as the command lines set it, and prints the minimum and median over
``--calls`` calls of: the MiT encoder, each model's per-frame ``encode``, MRCFA's fuse, ``aggregate`` (3
references) and per-frame logits, then ``aggregate`` step by step (affinities, STM, the SAR/MAA blocks of each
scale, softmax, retrieval, merge, classifier, resize), timed between its steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from speed_worker import _tune_host_allocator, build

import vss.models.aggregators.mrcfa as mrcfa
from vss.models.aggregators.base import resize


def timed(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """(min, median) ms of ``calls`` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return 1e3 * min(seconds), 1e3 * statistics.median(seconds)


def aggregate_by_step(agg: mrcfa.MRCFA, target: dict, refs: list[dict], spent: dict[str, list[float]]) -> torch.Tensor:
    """MRCFA.aggregate at inference (affinity fusion, official merge, three scales), timed between its steps."""
    marks = [time.perf_counter()]

    def mark(name: str) -> None:
        marks.append(time.perf_counter())
        spent[name].append(marks[-1] - marks[-2])

    r = len(refs)

    def stacked(key: str) -> torch.Tensor:
        return torch.stack([f[key] for f in refs], dim=1)

    def affinity(scale: str, keys: torch.Tensor) -> torch.Tensor:
        return mrcfa.cross_frame_affinity(target[f"query_{scale}"].flatten(1, 2), keys)

    grids = {s: tuple(target[f"query_{s}"].shape[1:3]) for s in agg.scales}
    full = affinity("s32", stacked("key_s32"))
    mark("affinity 1/32 (all tokens)")
    index = agg.token_masking(full.transpose(1, 2))
    mark("STM")
    a = {"s32": mrcfa.select_affinities(full, index)}
    a["s16"] = affinity("s16", mrcfa.select_tokens(stacked("key_s16"), index))
    mark("affinity 1/16")
    a["s8"] = affinity("s8", mrcfa.select_tokens(stacked("key_s8"), index))
    mark("affinity 1/8")
    values = mrcfa.select_tokens(stacked("value"), index)
    maps = {k: mrcfa.affinity_maps(v, grids[k]) for k, v in a.items()}
    mark("values")
    d = agg.affinity_decoder
    out = d.refine["s32"](maps["s32"])
    mark("SAR 1/32")
    a16 = d.refine["s16"](maps["s16"])
    mark("SAR 1/16")
    out = d.aggregate["s16"](mrcfa._upsample(out, a16.shape[-2:]) + a16)
    mark("MAA 1/16 (with upsample + add)")
    a8 = d.refine["s8"](maps["s8"])
    mark("SAR 1/8")
    out = d.aggregate["s8"](mrcfa._upsample(out, a8.shape[-2:]) + a8)
    mark("MAA 1/8 (with upsample + add)")
    attention = mrcfa.attention_over_tokens(out, r)
    mark("softmax")
    mean = mrcfa.retrieve(attention, values, per_reference=False)
    mark("retrieval (mean over references)")
    merged = mrcfa._as_map(mean, target["feat8"].shape[-2:]) + target["feat8"]
    mark("merge (+ own 1/8 feature)")
    logits = mrcfa._classify(agg.classifier, merged)
    mark("classifier at 1/8")
    logits = resize(logits, target["fused"].shape[-2:])
    mark("resize to 1/4")
    spent["aggregate, step by step"].append(marks[-1] - marks[0])
    return logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("height", type=int, nargs="?", default=256)
    parser.add_argument("width", type=int, nargs="?", default=448)
    parser.add_argument("--calls", type=int, default=60)
    a = parser.parse_args()
    _tune_host_allocator()
    torch.manual_seed(0)
    model, baseline = build("mrcfa", "mit_b1", {}), build("segformer", "mit_b1", {})
    agg = model.aggregator
    frames = torch.randn(4, 3, a.height, a.width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        feats = model.encoder(frames[:1])
        encoded = [agg.encode(model.encoder(frames[i : i + 1])) for i in range(4)]
        target, refs = encoded[-1], [agg.reference_features(e) for e in encoded[:3]]
        rows = {
            "MiT-B1 encoder": lambda: model.encoder(frames[:1]),
            "SegFormer encode (fuse + classify)": lambda: baseline.aggregator.encode(feats),
            "MRCFA encode": lambda: agg.encode(feats),
            "MRCFA fuse": lambda: agg.decode_head.fuse(feats),
            "MRCFA aggregate (3 references)": lambda: agg.aggregate(target, refs),
            "MRCFA per-frame logits (a target alone)": lambda: agg.frame_logits(target),
        }
        print(f"{a.height}x{a.width}, {torch.get_num_threads()} threads, ms per call")
        print("| part | min | median |\n|---|---|---|")
        for name, fn in rows.items():
            lo, med = timed(fn, a.calls)
            print(f"| {name} | {lo:.2f} | {med:.2f} |")
        spent: dict[str, list[float]] = defaultdict(list)
        if not torch.equal(aggregate_by_step(agg, target, refs, spent), agg.aggregate(target, refs)["logits"]):
            raise SystemExit("the step-by-step aggregate no longer computes MRCFA.aggregate: update this script")
        spent.clear()
        for _ in range(a.calls):
            aggregate_by_step(agg, target, refs, spent)
    print("| aggregate step | median ms |\n|---|---|")
    for name, seconds in spent.items():
        print(f"| {name} | {1e3 * statistics.median(seconds):.2f} |")


if __name__ == "__main__":
    main()
