"""``vss.predict backend=onnx|pt2|compile``: the exported (or compiled) step gives the masks of ``backend=eager``
on a video; a bad backend, a missing export file and a frame size the export does not take are one line."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from random_weights import write_tiny_checkpoints
from test_export import compose_export
from test_predict import moving_shapes, read_mask, run_predict
from vss.data.transforms import build_eval_transform
from vss.errors import ConfigError
from vss.export import export

SIDE = 64  # the checkpoints' data.scale: a 48x80 frame is prepared at 64x64 (keep-ratio, then sides of 32)
FRAMES, HW = 12, (48, 80)
MODELS = {  # causal (references before the target) and with a reference after the target (lookahead 1)
    "mrcfa": ["model=mrcfa"],
    "mrcfa_lookahead": ["model=mrcfa", "model.offsets=[-2,1]", "model.start=clamp"],
}
pytest.importorskip("onnxruntime", reason="pip install -e '.[export]'")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight checkpoints in the vss.train layout."""
    return write_tiny_checkpoints(tmp_path_factory.mktemp("backend-ckpts"), MODELS, SIDE)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-frame 48x80 mp4 of moving shapes."""
    path = tmp_path_factory.mktemp("backend-src") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (HW[1], HW[0]))
    for f in moving_shapes(FRAMES, HW):
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def exported(ckpt: Path, fmt: str, out: Path, side: int = SIDE) -> Path:
    """``vss.export`` of ``ckpt`` into ``out``."""
    export(compose_export(f"ckpt_path={ckpt}", f"format={fmt}", f"height={side}", f"width={side}", f"output={out}"))
    return out


def masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: read_mask(p) for p in sorted((folder / "masks").glob("*.png"))}


def test_video_is_prepared_at_the_export_size() -> None:
    frame = np.zeros((*HW, 3), np.uint8)
    assert build_eval_transform([SIDE, SIDE], 32)(images=frame[None])["images"].shape[-2:] == (SIDE, SIDE)


@pytest.mark.parametrize(
    ("model", "fmt"),
    [  # the lookahead MRCFA (start policy, ring, flush) in the default run; the causal one under -m slow
        pytest.param(m, f, id=f"{m}-{f}", marks=() if m == "mrcfa_lookahead" else pytest.mark.slow)
        for m in MODELS
        for f in ("onnx", "pt2")
    ],
)
def test_exported_backend_masks_equal_eager(
    model: str, fmt: str, ckpts: dict[str, Path], video: Path, tmp_path: Path
) -> None:
    folder = exported(ckpts[model], fmt, tmp_path / "export")
    eager = run_predict(f"ckpt_path={ckpts[model]}", f"source={video}", f"output={tmp_path / 'eager'}")
    got = run_predict(f"backend={fmt}", f"export={folder}", f"source={video}", f"output={tmp_path / fmt}")
    want, have = masks(tmp_path / "eager"), masks(tmp_path / fmt)
    assert len(want) == FRAMES and list(have) == list(want)
    for name in want:
        assert have[name].shape == HW
        assert np.array_equal(have[name], want[name]), f"{model} {fmt} frame {name}: masks differ"
    assert len(np.unique(np.stack(list(want.values())))) > 1  # varied class maps, not one class everywhere
    assert (got["backend"], got["frames"], eager["backend"]) == (fmt, FRAMES, "eager")
    assert got["runs_on"] == ("CPUExecutionProvider" if fmt == "onnx" else "cpu") and got["fps"] > 0
    assert got["ckpt_path"] is None and got["export"] == str(folder)
    assert [c["name"] for c in got["classes"]] == [c["name"] for c in eager["classes"]]
    assert json.loads((tmp_path / fmt / "predict.json").read_text())["backend"] == fmt


@pytest.mark.slow
def test_compile_backend_masks_equal_eager(ckpts: dict[str, Path], video: Path, tmp_path: Path) -> None:
    ckpt = ckpts["mrcfa_lookahead"]
    run_predict(f"ckpt_path={ckpt}", f"source={video}", f"output={tmp_path / 'eager'}")
    got = run_predict("backend=compile", f"ckpt_path={ckpt}", f"source={video}", f"output={tmp_path / 'compile'}")
    want, have = masks(tmp_path / "eager"), masks(tmp_path / "compile")
    assert got["frames"] == FRAMES and list(have) == list(want)
    for name in want:
        assert np.array_equal(have[name], want[name]), f"compile frame {name}: masks differ"


def test_graph_dry_masks_equal_eager_and_graph_needs_cuda(ckpts: dict[str, Path], video: Path, tmp_path: Path) -> None:
    """graph=dry: the static step of the CUDA-graph path, uncaptured (checked free of host reads), uint8 frames
    normalised inside it: the masks of the Streamer; graph=true on the CPU, or with an exported backend: one line."""
    ckpt = ckpts["mrcfa_lookahead"]
    run_predict(f"ckpt_path={ckpt}", f"source={video}", f"output={tmp_path / 'eager'}")
    got = run_predict("graph=dry", f"ckpt_path={ckpt}", f"source={video}", f"output={tmp_path / 'dry'}")
    want, have = masks(tmp_path / "eager"), masks(tmp_path / "dry")
    assert got["frames"] == FRAMES and got["graph"] == "dry" and list(have) == list(want)
    for name in want:
        assert np.array_equal(have[name], want[name]), f"graph=dry frame {name}: masks differ"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^graph=true needs CUDA \(the model is on cpu\)"):
            run_predict("graph=true", f"ckpt_path={ckpt}", f"source={video}", f"output={tmp_path / 'g'}")
    with pytest.raises(ConfigError, match=r"^graph=dry replays the checkpoint's step: use it with backend=eager"):
        run_predict("graph=dry", "backend=onnx", f"export={tmp_path}", f"source={video}", f"output={tmp_path / 'o'}")
    with pytest.raises(ConfigError, match=r"^graph='yes' is invalid: expected false, true \(CUDA\) or dry"):
        run_predict("graph=yes", f"ckpt_path={ckpt}", f"source={video}", f"output={tmp_path / 'y'}")


def test_graph_options_ids_first_and_bf16(ckpts: dict[str, Path], video: Path, tmp_path: Path) -> None:
    """graph=dry with ids_first (the argmax at the logits' size, ids upsampled by nearest: other ids only along
    class borders) and with dtype=bf16 (the step in bfloat16: most pixels keep their fp32 class); the options
    without a graph, tf32 off CUDA and an unknown dtype are one line each."""
    ckpt = ckpts["mrcfa_lookahead"]
    src = f"source={video}"
    run_predict(f"ckpt_path={ckpt}", src, f"output={tmp_path / 'eager'}")
    got = run_predict("graph=dry", "ids_first=true", f"ckpt_path={ckpt}", src, f"output={tmp_path / 'ids'}")
    assert got["graph_options"] == {"tf32": False, "ids_first": True, "dtype": "fp32"}
    have = masks(tmp_path / "ids")
    eager = masks(tmp_path / "eager")
    differ = sum(int((have[n] != eager[n]).sum()) for n in eager)
    assert 0 < differ < 0.05 * FRAMES * HW[0] * HW[1]  # class borders only (0.55% here)
    got = run_predict("graph=dry", "dtype=bf16", f"ckpt_path={ckpt}", src, f"output={tmp_path / 'bf16'}")
    bf16 = masks(tmp_path / "bf16")
    agree = sum(int((bf16[n] == eager[n]).sum()) for n in eager) / (FRAMES * HW[0] * HW[1])
    assert got["graph_options"]["dtype"] == "bf16" and agree > 0.97  # 99.9% here
    for option in ("ids_first=true", "dtype=bf16", "tf32=true"):
        key = option.split("=")[0]
        with pytest.raises(ConfigError, match=rf"^{key}=\S+ is an option of the step's graph: add graph=true"):
            run_predict(option, f"ckpt_path={ckpt}", src, f"output={tmp_path / 'x'}")
    with pytest.raises(ConfigError, match=r"^tf32=true sets TF32 for CUDA matmuls and convolutions \(device=cpu\)"):
        run_predict("graph=dry", "tf32=true", "device=cpu", f"ckpt_path={ckpt}", src, f"output={tmp_path / 't'}")
    with pytest.raises(ConfigError, match=r"^dtype='fp16' is invalid: expected one of \['fp32', 'bf16'\]"):
        run_predict("graph=dry", "dtype=fp16", f"ckpt_path={ckpt}", src, f"output={tmp_path / 'h'}")


def test_bad_backend_missing_file_and_size_mismatch(ckpts: dict[str, Path], video: Path, tmp_path: Path) -> None:
    src = f"source={video}"
    with pytest.raises(ConfigError, match=r"^backend='tensorrt' is invalid: expected one of \['eager'"):
        run_predict("backend=tensorrt", f"ckpt_path={ckpts['mrcfa']}", src, f"output={tmp_path / 'a'}")
    with pytest.raises(ConfigError, match=r"^export is required but not set"):
        run_predict("backend=onnx", src, f"output={tmp_path / 'b'}")
    folder = exported(ckpts["mrcfa"], "pt2", tmp_path / "export", side=32)
    with pytest.raises(ConfigError, match=r"holds no step\.onnx: write it with python -m vss\.export format=onnx"):
        run_predict("backend=onnx", f"export={folder}", src, f"output={tmp_path / 'c'}")
    with pytest.raises(ConfigError) as e:
        run_predict("backend=pt2", f"export={folder}", src, f"output={tmp_path / 'd'}")
    assert "prepared at 64x64" in str(e.value) and "takes 32x32" in str(e.value)
    assert "export it with height=64 width=64" in str(e.value) and "\n" not in str(e.value)
    assert not list((tmp_path / "d" / "masks").glob("*.png"))
