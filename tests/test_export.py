"""``python -m vss.export``: the exported step (pt2, ONNX) loaded back and run over a video with its state
threaded equals the eager :class:`~vss.models.step.Step`; refused exports are one line and leave no file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from conftest import REPO_ROOT, TINY_DATA, compose_train
from random_weights import randomize_
from vss import exported as exported_module
from vss.config import CONF_DIR, register_resolvers
from vss.errors import ConfigError, friendly_errors
from vss.export import check_video, export
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


def write_tiny_checkpoints(root: Path, models: dict[str, list[str]], side: int) -> dict[str, Path]:
    """Tiny random-weight checkpoints (mit_b0, ``embed_dim=16``, ``data.scale=[side, side]``) in the vss.train
    layout, one per ``models`` entry (name -> overrides)."""
    out: dict[str, Path] = {}
    for name, extra in models.items():
        cfg = compose_train(
            [
                *TINY_DATA,
                *extra,
                "encoder=mit_b0",
                "model.embed_dim=16",
                f"data.scale=[{side},{side}]",
                f"paths.output_dir={root}",
                f"paths.data_dir={root / 'data'}",
            ]
        )
        GlobalHydra.instance().clear()
        with open_dict(cfg):
            del cfg["hydra"]
        module = build_module(cfg, cfg.data.num_classes, list(cfg.data.class_names))
        randomize_(module.segmenter, seed=1)
        out[name] = root / f"{name}.ckpt"
        config = OmegaConf.to_container(cfg, resolve=True)
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": config}}, out[name])
    return out


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


def test_readme_snippet_runs_the_onnx_file(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """The README's ONNX Runtime snippet (numpy + onnxruntime only) gives the eager step's class ids."""
    export(
        compose_export(
            f"ckpt_path={ckpts['mrcfa_lookahead']}",
            "format=onnx",
            f"height={SIDE}",
            f"width={SIDE}",
            f"output={tmp_path}",
        )
    )
    readme = (REPO_ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- onnx-snippet -->\s*```python\n(.*?)```", readme, re.S)
    assert snippet, "README.md: the ONNX Runtime snippet after <!-- onnx-snippet --> is missing"
    namespace: dict = {}
    exec(snippet.group(1), namespace)  # defines segment(folder, frames)
    video = check_video(SIDE, SIDE, 1, FRAMES, seed=4)
    frames = [f[0].transpose(1, 2, 0) for f in video]  # (H, W, 3) RGB as a user reads them
    got = list(namespace["segment"](str(tmp_path), frames))
    step = eager_step(ckpts["mrcfa_lookahead"])
    state, expected = step.init_state(SIDE, SIDE, 1), []
    for frame in video:
        o, state = step.step(torch.from_numpy(frame), state)
        expected += [o] if o["valid"] else []
    expected += [o for o in step.flush(state, SIDE, SIDE) if o["valid"]]
    assert [t for t, _ in got] == list(range(FRAMES))
    for (_, ids), o in zip(got, expected, strict=True):
        assert np.array_equal(ids, o["logits"].argmax(1)[0].numpy())


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
