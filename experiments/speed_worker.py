"""Timing worker for experiments/speed.md: builds one model from whichever ``vss`` is on the path and times it.

``python experiments/speed_worker.py MODEL ENCODER H W [key=value ...]`` reads commands on stdin, one a line:
``stream N`` times N steady-state streaming steps (one frame pushed into a warm :class:`Streamer`) and prints
their median ms; ``official N`` (MRCFA only) times the official clip path (tests/reference_mrcfa.py head on the
reference MiT, T = 4 frames encoded per target) and prints its median ms; ``quit`` ends. Run one worker per code
tree (``PYTHONPATH=/tmp/today/src`` for the commit before the change) and send commands to them in turn
(experiments/speed_compare.py), so that both trees see the same machine load. Both trees run with the glibc
allocator settings of ``vss.runtime.tune_host_allocator`` (set here, so a tree without that module gets them
too); ``VSS_MALLOC=default`` keeps glibc's defaults for both.
"""

from __future__ import annotations

import ast
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from vss.models.encoders import build_encoder
from vss.models.segmenter import Segmenter
from vss.models.streamer import Streamer


def _tune_host_allocator() -> None:
    """``vss.runtime.tune_host_allocator`` of this checkout, loaded by path: the ``vss`` on the path may be an older
    tree without that module, and both trees must run with the same allocator."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "src" / "vss" / "runtime.py"
    spec = importlib.util.spec_from_file_location("_vss_runtime_of_this_checkout", path)
    assert spec is not None and spec.loader is not None
    runtime = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime)
    runtime.tune_host_allocator()


def _value(text: str) -> object:
    """A ``key=value`` argument's value as a Python literal (``2``, ``1.0``, ``[]``, ``[-2, -1]``), else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def build(model: str, encoder: str, extra: dict[str, str]) -> Segmenter:
    """Random-weight model in eval mode (124 classes, as VSPW)."""
    torch.manual_seed(0)
    kwargs = {k: _value(v) for k, v in extra.items()}
    if model == "segformer":
        from vss.models.aggregators.segformer import SegFormer

        agg = partial(SegFormer)
    elif model == "mrcfa":
        from vss.models.aggregators.mrcfa import MRCFA

        agg = partial(MRCFA, encoder_name=encoder, **kwargs)
    elif model == "msaf":
        from vss.models.aggregators.msaf import MSAF

        agg = partial(MSAF, **kwargs)
    else:
        raise SystemExit(f"unknown model {model!r}")
    return Segmenter(build_encoder(encoder, drop_path_rate=0.0), agg, 124).eval()


def main() -> None:
    """Serve timing commands on stdin."""
    _tune_host_allocator()
    model_name, encoder, h, w, *rest = sys.argv[1:]
    extra = dict(a.split("=", 1) for a in rest)
    model = build(model_name, encoder, extra)
    h, w = int(h), int(w)
    gen = torch.Generator().manual_seed(0)
    frames = torch.randn(12, 3, h, w, generator=gen)
    streamer = Streamer(model, batch_size=1)
    count = 0

    def step() -> None:
        nonlocal count
        out = streamer.push(frames[count % len(frames)])
        assert len(out) == (1 if count >= model.lookahead else 0)
        count += 1

    with torch.inference_mode():
        for _ in range(10):  # past MRCFA's official start clips: the steady state
            step()
        official = None
        print("ready", flush=True)
        for line in sys.stdin:
            cmd, *args = line.split()
            n = int(args[0]) if args else 1
            times = []
            if cmd == "stream":
                for _ in range(n):
                    t0 = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - t0)
            elif cmd == "official":
                if official is None:
                    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
                    from reference_mit import build_reference_mit
                    from reference_mrcfa import OfficialMRCFAHead

                    torch.manual_seed(0)
                    layout = "b1" if encoder == "mit_b1" else "b0"
                    mit = build_reference_mit(encoder).eval()
                    head = OfficialMRCFAHead(list(model.encoder.out_channels), 124, backbone=layout).eval()
                    clip = frames[:4]
                    official = partial(lambda h, m, c: h(m(c), 1, 4), head, mit, clip)
                    official()
                for _ in range(n):
                    t0 = time.perf_counter()
                    official()
                    times.append(time.perf_counter() - t0)
            elif cmd == "quit":
                break
            print(f"{1e3 * statistics.median(times):.2f}", flush=True)


if __name__ == "__main__":
    main()
