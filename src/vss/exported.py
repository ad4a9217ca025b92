"""Exported step files (``vss.export``): the graph that is exported (:class:`StepGraph`: the step with its state as
positional tensors) and the runner of an exported ``step.pt2`` / ``step.onnx`` with its ``spec.json``
(:func:`open_exported`), shared by the export-time check and ``vss.predict backend=onnx|pt2``."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vss.errors import ConfigError
from vss.models.step import Step

FILES = {"pt2": "step.pt2", "onnx": "step.onnx"}

AOTI_FILE = "step.aoti.pt2"
"""The AOTInductor package ``vss.export format=pt2 aoti=true`` writes beside ``step.pt2`` (compiled C++ kernels)."""


def cpp_compiler() -> str | None:
    """The C++ compiler AOTInductor would call (``$CXX``, else ``c++``/``g++``/``clang++`` on PATH), or None."""
    import os
    import shutil

    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


OUTPUTS = ("logits", "valid", "index")


NEXT = "next."
"""Prefix of the state outputs: ``next.count`` is the ``count`` input of the next call."""


class StepGraph(nn.Module):
    """:meth:`Step.step` with the state as positional tensors (``names`` order): what is exported."""

    def __init__(self, step: Step, names: list[str]) -> None:
        super().__init__()
        self.step = step
        self.names = names

    def forward(self, frame: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """``(logits, valid, index, *next_state)``."""
        out, new = self.step.step(frame, dict(zip(self.names, state, strict=True)))
        return (*(out[k] for k in OUTPUTS), *(new[k] for k in self.names))


def _require_onnx() -> None:

    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"format=onnx needs {', '.join(missing)} (not installed): pip install -e '.[export]'")


def onnx_providers(cuda: bool) -> list[str]:
    """ONNX Runtime's execution providers: CUDA first where asked for and installed, then the CPU."""
    import onnxruntime as ort

    gpu = cuda and "CUDAExecutionProvider" in ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]


class Runner:
    """Runs an exported file: ``(frame, state) -> (logits, valid, index, next_state)`` (numpy in and out); the
    export-time check and ``vss.predict backend=onnx|pt2`` both run the file through it."""

    def __init__(self, fmt: str, path: Path, names: list[str], providers: list[str] | None = None) -> None:
        self.fmt, self.names = fmt, names
        self.device = "cpu"  # what runs the step: cpu, or ONNX Runtime's CUDA provider
        if fmt == "pt2":
            self.module = torch.export.load(str(path)).module()
        elif fmt == "aoti":  # an AOTInductor package: compiled kernels, loaded without Python tracing
            from torch._inductor import aoti_load_package

            self.module = aoti_load_package(str(path))
            self.device = "cpu, AOTInductor"
        else:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
            self.inputs = [i.name for i in self.session.get_inputs()]
            self.device = self.session.get_providers()[0]

    expected: dict[str, tuple[tuple[int, ...], str]] | None = None
    """Input name -> (shape, dtype) from spec.json (set by :func:`open_exported`): each call is checked first."""

    def check(self, frame: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """A frame or state that is not what the exported step takes: one :class:`ConfigError` naming the input."""
        if self.expected is None:
            return
        given = {"frame": frame, **state}
        missing = [k for k in self.expected if k not in given]
        extra = sorted(set(given) - set(self.expected))
        if missing or extra:
            raise ConfigError(
                f"exported step: the state has {'no ' + ', '.join(missing) if missing else ''}"
                f"{'; ' if missing and extra else ''}{'unknown ' + ', '.join(extra) if extra else ''}; expected the "
                f"inputs {list(self.expected)} (spec.json): start from the zero state, then feed each call's state back"
            )
        for k, (shape, dtype) in self.expected.items():
            v = np.asarray(given[k])
            if tuple(v.shape) != shape or str(v.dtype) != dtype:
                raise ConfigError(
                    f"exported step: input {k!r} is {str(v.dtype)} {tuple(v.shape)}, expected {dtype} {shape} "
                    "(spec.json: the size and batch it was exported at); start from the zero state, then feed each "
                    "call's state back"
                )

    def __call__(self, frame: np.ndarray, state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
        self.check(frame, state)
        if self.fmt in ("pt2", "aoti"):
            with torch.no_grad():
                got = self.module(torch.from_numpy(frame), *(torch.from_numpy(state[k]) for k in self.names))
            got = [g.numpy() for g in got]
        else:
            feeds = {"frame": frame, **state}
            got = self.session.run(None, {k: feeds[k] for k in self.inputs})
        out = dict(zip(OUTPUTS, got[: len(OUTPUTS)], strict=True))
        return out, dict(zip(self.names, got[len(OUTPUTS) :], strict=True))


@dataclass
class Exported:
    """An export folder opened to run: its spec.json, the :class:`Runner` of its step file, the zero state."""

    folder: Path
    spec: dict[str, Any]
    runner: Runner
    zero: dict[str, np.ndarray]
    size: tuple[int, int]  # (height, width) of the frames the step takes
    batch: int  # videos per call


def open_exported(folder: str | Path, fmt: str, key: str = "export", cuda: bool = False) -> Exported:
    """``folder``'s spec.json and ``step.<fmt>`` (written by ``vss.export format=<fmt>``) ready to run; a
    :class:`ConfigError` naming ``key``, the folder and the missing or unreadable file."""
    path = Path(str(folder)).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{key}={str(path)!r} is invalid: expected a folder written by vss.export (no such folder)")
    spec_path, file = path / "spec.json", path / FILES[fmt]
    for f in (spec_path, file):
        if not f.is_file():
            raise ConfigError(
                f"{key}={str(path)!r} holds no {f.name}: write it with python -m vss.export format={fmt} output={path}"
            )
    try:
        spec = json.loads(spec_path.read_text())
        names = [s["name"] for s in spec["state"]]
        zero = {s["name"]: np.zeros(s["shape"], s["dtype"]) for s in spec["state"]}
        size = int(spec["preprocessing"]["height"]), int(spec["preprocessing"]["width"])
        batch = int(spec["inputs"][0]["shape"][0])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ConfigError(f"{key}={str(path)!r}: spec.json cannot be read as vss.export's spec ({e!r})") from None
    if fmt == "onnx":
        _require_onnx()
    kind = "aoti" if fmt == "pt2" and (path / AOTI_FILE).is_file() else fmt  # the compiled package where written
    file = path / AOTI_FILE if kind == "aoti" else file
    try:
        runner = Runner(kind, file, names, onnx_providers(cuda) if fmt == "onnx" else None)
    except Exception as e:  # a damaged or foreign file
        first = " ".join(str(e).split())[:200]
        raise ConfigError(f"{key}={str(path)!r}: {file.name} cannot be loaded ({type(e).__name__}: {first})") from None
    runner.expected = {i["name"]: (tuple(i["shape"]), str(i["dtype"])) for i in spec["inputs"]}
    return Exported(path, spec, runner, zero, size, batch)
