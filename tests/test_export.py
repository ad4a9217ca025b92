"""``python -m vss.export``: the exported step (pt2, ONNX) loaded back and run over a video with its state
threaded equals the eager :class:`~vss.models.step.Step`; refused exports are one line and leave no file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from conftest import REPO_ROOT
from random_weights import write_tiny_checkpoints
from test_predict import moving_shapes, read_mask, run_predict
from vss import exported as exported_module
from vss.config import CONF_DIR, register_resolvers
from vss.errors import ConfigError, friendly_errors
from vss.export import check_video, export, run_eager, run_exported
from vss.lit import build_module
from vss.models.ops.normalize import normalize_frames
from vss.models.step import Step

SIDE = 32
FRAMES = 10
MODELS = {  # name -> overrides: single-frame, MRCFA (start policy), MRCFA with a reference after the target
    "segformer": ["model=segformer"],
    "mrcfa": ["model=mrcfa"],
    "mrcfa_lookahead": ["model=mrcfa", "model.offsets=[-2,1]", "model.start=clamp"],
}
onnxruntime = pytest.importorskip("onnxruntime", reason="pip install -e '.[export]'")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight checkpoints in the vss.train layout."""
    return write_tiny_checkpoints(tmp_path_factory.mktemp("export-ckpts"), MODELS, SIDE)


def compose_export(*overrides: str) -> DictConfig:
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="export", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def eager_step(ckpt: Path) -> Step:
    """The checkpoint's step rebuilt independently of vss.export."""
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    cfg = OmegaConf.create(saved["hyper_parameters"]["config"])
    module = build_module(cfg, cfg.data.num_classes, list(cfg.data.class_names))
    module.load_state_dict(saved["state_dict"])
    return Step(module.segmenter.eval())


def run_file(out: Path, video: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """The exported file in ``out`` loaded back as a user would (spec.json, zero state, the flush by repetition)."""
    spec = json.loads((out / "spec.json").read_text())
    state = {s["name"]: np.zeros(s["shape"], s["dtype"]) for s in spec["state"]}
    assert [i["name"] for i in spec["inputs"]] == ["frame", *state]
    if spec["format"] == "pt2":
        module = torch.export.load(str(out / spec["file"])).module()

        def call(frame: np.ndarray) -> list[np.ndarray]:
            args = [torch.from_numpy(frame), *(torch.from_numpy(v) for v in state.values())]
            with torch.no_grad():
                return [t.numpy() for t in module(*args)]
    else:
        session = onnxruntime.InferenceSession(str(out / spec["file"]), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [i["name"] for i in spec["inputs"]]
        assert [o.name for o in session.get_outputs()] == [o["name"] for o in spec["outputs"]]

        def call(frame: np.ndarray) -> list[np.ndarray]:
            return session.run(None, {"frame": frame, **state})

    got = []
    for frame in [*video, *[video[-1]] * spec["lookahead"]]:
        logits, valid, index, *new = call(frame)
        state = dict(zip(state, new, strict=True))
        if valid:
            got.append((int(index), logits))
    return got


DEFAULT_RUN = {("mrcfa_lookahead", "onnx"), ("segformer", "pt2")}
"""The cases of the default run (the lookahead MRCFA covers the start policy, the ring and the flush; its pt2
export is also run, masks against eager, by test_predict_backends); the others run under ``-m slow`` (make test
stays under 12 minutes on 2 cores)."""


@pytest.mark.parametrize(
    ("model", "fmt"),
    [
        pytest.param(m, f, id=f"{m}-{f}", marks=() if (m, f) in DEFAULT_RUN else pytest.mark.slow)
        for m in MODELS
        for f in ("pt2", "onnx")
    ],
)
def test_exported_step_equals_the_eager_step(model: str, fmt: str, ckpts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = export(
        compose_export(f"ckpt_path={ckpts[model]}", f"format={fmt}", f"height={SIDE}", f"width={SIDE}", f"output={out}")
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([spec["file"], "spec.json"])
    assert spec["check"]["max_abs_diff"] <= 1e-4 and spec["check"]["equal_class_ids"] == 1.0
    step = eager_step(ckpts[model])
    assert spec["lookahead"] == step.lookahead == (1 if model == "mrcfa_lookahead" else 0)
    video = check_video(SIDE, SIDE, 1, FRAMES, seed=3)  # another video than the export-time check's
    state = step.init_state(SIDE, SIDE, 1)
    expected = []
    for frame in video:
        o, state = step.step(torch.from_numpy(frame), state)
        expected += [o] if o["valid"] else []
    expected += [o for o in step.flush(state, SIDE, SIDE) if o["valid"]]
    got = run_file(out, video)
    assert [i for i, _ in got] == [int(o["index"]) for o in expected] == list(range(FRAMES))
    for (t, logits), o in zip(got, expected, strict=True):
        ref = o["logits"]
        err = (torch.from_numpy(logits) - ref).abs().max().item()
        assert err <= 1e-4, f"{model} {fmt} frame {t}: logits differ by {err:.3g}"
        assert torch.equal(torch.from_numpy(logits).argmax(1), ref.argmax(1)), f"{model} {fmt} frame {t}: class ids"
    assert len({int(o["logits"].argmax(1).unique().numel()) for o in expected}) >= 1


def test_spec_describes_the_state_and_preprocessing(ckpts: dict[str, Path], tmp_path: Path) -> None:
    spec = export(
        compose_export(
            f"ckpt_path={ckpts['mrcfa']}",
            "format=pt2",
            f"height={SIDE}",
            f"width={SIDE}",
            "batch=2",
            f"output={tmp_path}",
        )
    )
    zero = eager_step(ckpts["mrcfa"]).init_state(SIDE, SIDE, 2)
    assert [(s["name"], s["shape"], s["dtype"]) for s in spec["state"]] == [
        (k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in zero.items()
    ]
    assert spec["inputs"][0] == {"name": "frame", "shape": [2, 3, SIDE, SIDE], "dtype": "uint8"}
    assert [o["name"] for o in spec["outputs"]] == ["logits", "valid", "index", *(f"next.{k}" for k in zero)]
    assert spec["outputs"][1]["dtype"] == "bool" and spec["outputs"][2]["dtype"] == "int64"
    assert len(spec["classes"]) == spec["outputs"][0]["shape"][1]
    # the normalisation inside the graph is the data pipeline's (vss.models.ops.normalize)
    mean, std = (np.array(spec["preprocessing"]["normalisation_inside"][k], np.float32) for k in ("mean", "std"))
    x = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    manual = (x.float() - torch.from_numpy(mean).view(3, 1, 1)) / torch.from_numpy(std).view(3, 1, 1)
    assert torch.allclose(manual, normalize_frames(x), atol=1e-5)
    # a frame or state not of the exported shapes: one line naming the input, before the runtime sees it
    opened = exported_module.open_exported(tmp_path, "pt2")
    frame = np.zeros((2, 3, SIDE, SIDE), np.uint8)
    opened.runner(frame, dict(opened.zero))  # the zero state runs
    key = next(iter(opened.zero))
    one_video = {**opened.zero, key: opened.zero[key][:, :1] if opened.zero[key].ndim > 1 else opened.zero[key][None]}
    with pytest.raises(ConfigError, match=rf"^exported step: input '{re.escape(key)}' is \S+ \(.*\), expected "):
        opened.runner(frame, one_video)
    with pytest.raises(ConfigError, match=r"^exported step: input 'frame' is uint8 \(1, 3, "):
        opened.runner(frame[:1], dict(opened.zero))
    with pytest.raises(ConfigError, match=rf"^exported step: the state has no {re.escape(key)};"):
        opened.runner(frame, {k: v for k, v in opened.zero.items() if k != key})


def test_readme_snippet_runs_the_onnx_file(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """The README's ONNX Runtime snippet (onnxruntime, numpy, OpenCV only) gives vss.predict's masks on a video at
    twice the export size (frames resized down, logits upsampled to the frame)."""
    ckpt = ckpts["mrcfa_lookahead"]
    export(compose_export(f"ckpt_path={ckpt}", "format=onnx", f"height={SIDE}", f"width={SIDE}", f"output={tmp_path}"))
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (2 * SIDE, 2 * SIDE))
    for f in moving_shapes(FRAMES, (2 * SIDE, 2 * SIDE)):
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    readme = (REPO_ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- onnx-snippet -->\s*```python\n(.*?)```", readme, re.S)
    assert snippet, "README.md: the ONNX Runtime snippet after <!-- onnx-snippet --> is missing"
    assert not re.search(r"^\s*(import|from) (vss|torch)\b", snippet.group(1), re.M), "the snippet runs without vss"
    namespace: dict = {}
    exec(snippet.group(1), namespace)  # defines segment(folder, video)
    got = list(namespace["segment"](str(tmp_path), str(video)))
    run_predict(f"ckpt_path={ckpt}", f"source={video}", f"output={tmp_path / 'pred'}")
    expected = [read_mask(p) for p in sorted((tmp_path / "pred" / "masks").glob("*.png"))]
    assert [t for t, _ in got] == list(range(FRAMES)) and len(expected) == FRAMES
    for (_, ids), mask in zip(got, expected, strict=True):
        assert ids.shape == (2 * SIDE, 2 * SIDE)
        assert np.array_equal(ids, mask)


def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@pytest.fixture(scope="module")
def opaque_op() -> object:
    """A custom op with a fake kernel (torch.export traces it) and no ONNX translation."""
    op = torch.library.custom_op("vss_test_export::opaque", mutates_args=())(_opaque)
    op.register_fake(lambda x: torch.empty_like(x))
    return op


def test_an_op_the_exporter_lacks_is_named_in_one_line(
    opaque_op: object, ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    from vss.models.segmenter import Segmenter

    monkeypatch.setattr(Segmenter, "normalize", lambda self, f, valid=None: opaque_op(normalize_frames(f)))
    cfg = compose_export(
        f"ckpt_path={ckpts['segformer']}", "format=onnx", f"height={SIDE}", f"width={SIDE}", f"output={tmp_path}"
    )
    with pytest.raises(SystemExit) as exit_info:
        friendly_errors(export)(cfg)
    assert exit_info.value.code == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    named = "error: format=onnx: SegFormer cannot be exported (op vss_test_export.opaque.default is not supported)"
    assert err.startswith(named), err
    assert list(tmp_path.iterdir()) == [], "a refused export leaves no file"


def test_a_parity_failure_is_refused(ckpts: dict[str, Path], tmp_path: Path, capfd) -> None:
    """ONNX Runtime's kernels are not bit-equal to torch's: with atol far below that, the export is refused."""
    cfg = compose_export(
        f"ckpt_path={ckpts['segformer']}",
        "format=onnx",
        f"height={SIDE}",
        f"width={SIDE}",
        f"output={tmp_path}",
        "atol=1e-12",
    )
    with pytest.raises(SystemExit) as exit_info:
        friendly_errors(export)(cfg)
    assert exit_info.value.code == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "differs from the eager step" in err and "atol=1e-12" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["format=tflite"], r"format='tflite' is invalid: expected one of \['pt2', 'onnx', 'folder'\]"),
        (["height=40"], r"height=40 width=32: .*multiples of 32"),
        (["batch=0"], r"batch=0 is invalid: expected a positive integer"),
        (["format=onnx", "aoti=true"], r"aoti=true compiles the torch.export program: it goes with format=pt2"),
        (["format=pt2", "aoti=yes"], r"aoti='yes' is invalid: expected true or false"),
    ],
)
def test_bad_arguments(overrides: list[str], message: str, ckpts: dict[str, Path], tmp_path: Path) -> None:
    base = [f"ckpt_path={ckpts['segformer']}", f"height={SIDE}", f"width={SIDE}", f"output={tmp_path}"]
    with pytest.raises(ConfigError, match=message):
        export(compose_export(*base, *overrides))


def test_missing_onnx_packages_say_how_to_install(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(exported_module, "ONNX_PACKAGES", ("onnx", "vss_no_such_package"))
    cfg = compose_export(f"ckpt_path={ckpts['segformer']}", f"height={SIDE}", f"width={SIDE}", f"output={tmp_path}")
    with pytest.raises(ConfigError, match=r"needs vss_no_such_package \(not installed\): pip install -e '\.\[export"):
        export(cfg)


def test_aoti_without_a_compiler_is_one_line(ckpts: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CXX", raising=False)
    cfg = compose_export(
        f"ckpt_path={ckpts['segformer']}", "format=pt2", "aoti=true", f"height={SIDE}", f"width={SIDE}",
        f"output={tmp_path / 'out'}",
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"aoti=true needs a C\+\+ compiler .* leave aoti=false"):
        export(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # AOTInductor compiles C++ (a minute on two cores)
@pytest.mark.skipif(exported_module.cpp_compiler() is None, reason="AOTInductor needs a C++ compiler")
def test_aoti_package_equals_the_eager_step_and_predict_runs_it(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """format=pt2 aoti=true writes step.aoti.pt2 beside step.pt2, checked; open_exported (vss.predict
    backend=pt2) runs the package and gives the eager step's logits."""
    ckpt = ckpts["mrcfa_lookahead"]
    spec = export(
        compose_export(
            f"ckpt_path={ckpt}", "format=pt2", "aoti=true", f"height={SIDE}", f"width={SIDE}", f"output={tmp_path}"
        )
    )
    assert (tmp_path / "step.pt2").is_file() and (tmp_path / exported_module.AOTI_FILE).is_file()
    assert spec["aoti"]["check"]["max_abs_diff"] <= 1e-4 and spec["aoti"]["compile_s"] > 0
    opened = exported_module.open_exported(tmp_path, "pt2")
    assert opened.runner.fmt == "aoti"
    video = check_video(SIDE, SIDE, 1, FRAMES, seed=3)
    step = eager_step(ckpt)
    got = run_exported(opened.runner, step.init_state(SIDE, SIDE, 1), video, step.lookahead)
    expected = run_eager(step, video)
    assert [i for i, _ in got] == [i for i, _ in expected] == list(range(FRAMES))
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert np.allclose(a, b.numpy(), atol=1e-4)


class _Indexing(torch.nn.Module):
    """Outputs named like the step's, and an inner ``aten.index`` node, which the exporter names ``index``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        picked = x[:, torch.tensor([0, 2])]
        return picked * 2, x.sum() > 0, picked.sum()


def test_an_inner_value_named_like_an_output_is_renamed(tmp_path: Path) -> None:
    """PSPNet's step holds an ``aten.index`` node: its value must not become a second ``index`` (an invalid model)."""
    from vss.export import export_onnx

    x = torch.rand(1, 3, 4)
    export_onnx(_Indexing(), (x,), tmp_path / "m.onnx", ["frame"], ["logits", "valid", "index"])
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "valid", "index"]
    got = session.run(None, {"frame": x.numpy()})
    for a, b in zip(got, _Indexing()(x), strict=True):
        assert np.allclose(a, b.numpy())
