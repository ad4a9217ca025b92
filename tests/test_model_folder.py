"""The model folder (``vss.export format=folder``): safetensors + YAML/JSON only, rebuilt into the same module
(eval metrics and predicted masks equal the checkpoint's), taken by ``init_from`` and ``model=FOLDER``; a missing,
damaged or contradicting file is one line naming it."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from conftest import REPO_ROOT, TINY_DATA, compose_job, compose_train
from random_weights import randomize_
from vss.cli import model_argument
from vss.config import CONF_DIR, register_resolvers
from vss.errors import ConfigError
from vss.eval import evaluate_checkpoint
from vss.export import export
from vss.folder import CLASSES, CONFIG, FILES, PREPROCESSING, WEIGHTS
from vss.lit import build_module, load_module
from vss.predict import predict
from vss.stages import check_stages, init_weights

STEP = 7
RUN_METRICS = {"step": STEP, "val": {"mIoU": 0.4321, "fwIoU": 0.6, "mVC8": 0.9, "mVC16": 0.85, "flicker": 0.01}}


def compose(config: str, *overrides: str) -> DictConfig:
    """``conf/<config>.yaml`` composed in-process with ``overrides``."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config, overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def write_run(root: Path, data_dir: Path, model: str, seed: int = 1) -> Path:
    """``root/checkpoints/last.ckpt`` (random weights, global_step 7) and ``root/metrics.json``, the vss.train
    layout, of a tiny ``model`` on the tiny synthetic set in ``data_dir``."""
    cfg = compose_job(
        [
            *TINY_DATA,
            f"model={model}",
            "encoder=mit_b0",
            "model.embed_dim=16",
            "data.num_workers=0",
            "data.scale=[32,32]",
            f"paths.data_dir={data_dir}",
            f"paths.output_dir={root}",
        ]
    )
    module = build_module(cfg, cfg.data.num_classes, list(cfg.data.class_names))
    randomize_(module.segmenter, seed=seed)
    path = root / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": config}, "global_step": STEP}, path)
    (root / "metrics.json").write_text(json.dumps(RUN_METRICS))
    return path


def export_folder(ckpt: Path, out: Path, *extra: str) -> dict:
    return export(compose("export", f"ckpt_path={ckpt}", "format=folder", f"output={out}", *extra))


@pytest.fixture(scope="module")
def data_dir(make_data_dir: Callable[..., Path]) -> Path:
    return make_data_dir(*TINY_DATA)


@pytest.fixture(scope="module")
def runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints of MRCFA (references, start policy) and SegFormer in the vss.train layout."""
    root = tmp_path_factory.mktemp("folder-runs")
    return {m: write_run(root / m, data_dir, m) for m in ("mrcfa", "segformer")}


@pytest.fixture(scope="module")
def folders(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    for name, ckpt in runs.items():
        export_folder(ckpt, root / name)
    return {name: root / name for name in runs}


def data_root(ckpt: Path) -> str:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["config"]["data"]["root"]


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- what the folder holds -------------------------------------------------------------------------------------
def test_the_folder_holds_weights_and_text_only(folders: dict[str, Path], runs: dict[str, Path]) -> None:
    out = folders["mrcfa"]
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES), "extra or temporary files"
    weights = (out / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", weights[:8])  # safetensors: a little-endian header length, a JSON header, raw bytes
    header = json.loads(weights[8 : 8 + n])
    assert header["__metadata__"] == {"format": "vss-model-folder/1", "global_step": str(STEP)}
    for p in out.iterdir():  # no pickle (protocol 2+ opens with 0x80), no zip archive (torch.save)
        assert not p.read_bytes().startswith((b"\x80", b"PK")), p.name
    saved = torch.load(runs["mrcfa"], map_location="cpu", weights_only=True)["state_dict"]
    tensors = load_file(out / WEIGHTS)
    assert set(tensors) == {k.removeprefix("segmenter.") for k in saved}
    assert all(torch.equal(tensors[k.removeprefix("segmenter.")], v) for k, v in saved.items())

    config = yaml.safe_load((out / CONFIG).read_text())
    assert set(config) == {"seed", "val_mode", "freeze", "stm", "encoder", "model", "data"}
    assert config["data"]["root"] == "???" and config["encoder"]["pretrained"] is None
    text = (out / CONFIG).read_text()
    assert str(runs["mrcfa"].parents[1]) not in text, "a training path is left in config.yaml"
    prep = json.loads((out / PREPROCESSING).read_text())
    assert prep["scale"] == [32, 32] and prep["size_divisor"] == 32 and prep["input"]["dtype"] == "uint8"
    assert prep["mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert prep["std"] == pytest.approx([58.395, 57.12, 57.375])
    table = json.loads((out / CLASSES).read_text())
    assert [c["name"] for c in table["classes"]] == ["background", "red", "green", "blue", "yellow"]
    assert table["classes"][1]["color"] == [220, 45, 45]  # the synthetic set's red (vss.data.synthetic)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: vss\n")
    assert "| val | 0.4321 | 0.6000 | 0.9000 | 0.8500 | 0.0100 |" in card  # the run's metrics.json, step 7
    assert "MRCFA (mit_b0), 5 classes" in card and "| 1 | red |" in card


def test_card_without_figures_of_this_step(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["segformer"].parents[1], run)
    (run / "metrics.json").write_text(json.dumps({**RUN_METRICS, "step": STEP + 1}))
    export_folder(run / "checkpoints" / "last.ckpt", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "None recorded:" in card and f"no figures of step {STEP}" in card and "0.4321" not in card


# -- the same module -------------------------------------------------------------------------------------------
def eval_cfg(path: Path, out: Path, *extra: str) -> DictConfig:
    return compose(
        "eval", f"ckpt_path={path}", "progress=false", "num_workers=0", "device=cpu", f"paths.output_dir={out}", *extra
    )


@pytest.mark.parametrize("model", ["mrcfa", "segformer"])
def test_eval_of_the_folder_equals_the_checkpoint(
    model: str, runs: dict[str, Path], folders: dict[str, Path], tmp_path: Path
) -> None:
    ckpt = evaluate_checkpoint(eval_cfg(runs[model], tmp_path / "a"), tmp_path / "a")
    root = data_root(runs[model])
    folder = evaluate_checkpoint(eval_cfg(folders[model], tmp_path / "b", f"+data.root={root}"), tmp_path / "b")
    assert ckpt["frames"] == folder["frames"] > 0 and 0 < ckpt["mIoU"] < 1
    drop = ("ckpt_path", "seconds")
    assert {k: v for k, v in folder.items() if k not in drop} == {k: v for k, v in ckpt.items() if k not in drop}
    assert folder["global_step"] == STEP


def test_eval_of_a_folder_needs_a_data_root(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"a model folder carries no data root: pass \+data.root=DIR"):
        evaluate_checkpoint(eval_cfg(folders["segformer"], tmp_path), tmp_path)


def test_predicted_masks_of_the_folder_equal_the_checkpoints(
    runs: dict[str, Path], folders: dict[str, Path], tmp_path: Path
) -> None:
    src = tmp_path / "frames"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        frame = cv2.GaussianBlur(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8), (7, 7), 0)
        cv2.imwrite(str(src / f"{i:02d}.png"), frame)
    masks = {}
    for name, path in (("ckpt", runs["mrcfa"]), ("folder", folders["mrcfa"])):
        out = tmp_path / name
        predict(
            compose(
                "predict",
                f"ckpt_path={path}",
                f"source={src}",
                f"output={out}",
                "progress=false",
                "save_overlay=false",
                "device=cpu",
            )
        )
        masks[name] = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((out / "masks").glob("*.png"))]
    assert len(masks["ckpt"]) == 6 and len(np.unique(np.stack(masks["ckpt"]))) > 1
    assert all(np.array_equal(a, b) for a, b in zip(masks["ckpt"], masks["folder"], strict=True))


def test_init_from_a_folder_loads_every_tensor(
    runs: dict[str, Path], folders: dict[str, Path], data_dir: Path, tmp_path: Path
) -> None:
    cfg = compose_job(
        [
            *TINY_DATA,
            "model=mrcfa",
            "encoder=mit_b0",
            "model.embed_dim=16",
            f"init_from={folders['mrcfa']}",
            f"paths.data_dir={data_dir}",
            f"paths.output_dir={tmp_path}",
        ]
    )
    state = check_stages(cfg)
    module = build_module(cfg, cfg.data.num_classes)
    report = init_weights(module.segmenter, cfg, state)
    assert not report.missing and not report.unexpected and len(report.loaded) == len(module.segmenter.state_dict())
    saved = torch.load(runs["mrcfa"], map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved["segmenter." + k]) for k, v in module.segmenter.state_dict().items())


def test_export_pt2_from_a_folder(folders: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    spec = export(
        compose(
            "export",
            f"ckpt_path={folders['segformer']}",
            "format=pt2",
            "height=32",
            "width=32",
            f"output={tmp_path}",
            "check_frames=3",
        )
    )
    assert (tmp_path / "step.pt2").is_file() and spec["check"]["max_abs_diff"] <= 1e-4
    assert "parity over 3 frames" in capfd.readouterr().out


def test_predict_runs_the_step_exported_into_the_folder(folders: dict[str, Path], tmp_path: Path) -> None:
    """``vss.export model=FOLDER format=pt2 output=FOLDER``, then ``vss.predict model=FOLDER backend=pt2`` (no
    export=): the masks of backend=eager; a folder without that export: one line saying how to write it."""
    folder = copy_folder(folders["segformer"], tmp_path / "model")
    src = tmp_path / "frames"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        cv2.imwrite(str(src / f"{i:02d}.png"), cv2.GaussianBlur(rng.integers(0, 255, (32, 32, 3), np.uint8), (5, 5), 0))

    def run(backend: str) -> list[np.ndarray]:
        out = tmp_path / backend
        predict(
            compose(
                "predict",
                f"ckpt_path={folder}",
                f"backend={backend}",
                f"source={src}",
                f"output={out}",
                "progress=false",
                "save_overlay=false",
                "device=cpu",
            )
        )
        return [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted((out / "masks").glob("*.png"))]

    with pytest.raises(ConfigError, match=r"^backend=pt2 runs the step vss.export wrote: pass export=DIR, or export "):
        run("pt2")
    export(compose("export", f"ckpt_path={folder}", "format=pt2", "height=32", "width=32", f"output={folder}"))
    eager, exported = run("eager"), run("pt2")
    assert len(eager) == 4 and all(np.array_equal(a, b) for a, b in zip(eager, exported, strict=True))


# -- model=FOLDER --------------------------------------------------------------------------------------------------
def test_model_argument_names_the_folder(folders: dict[str, Path]) -> None:
    path = folders["mrcfa"]
    assert model_argument([f"model={path}", "mode=clip", "model.top_n=3"]) == [
        f"ckpt_path={path}",
        "mode=clip",
        "model.top_n=3",
    ]
    assert model_argument([f"model='{path}'"]) == [f"ckpt_path='{path}'"]
    with pytest.raises(ConfigError, match=r"model=mrcfa: no model folder or checkpoint file there"):
        model_argument(["model=mrcfa"])
    with pytest.raises(ConfigError, match=r"both name the model"):
        model_argument([f"model={path}", f"ckpt_path={path}"])


def test_eval_cli_model_folder(runs: dict[str, Path], folders: dict[str, Path], cli_env: dict, tmp_path: Path) -> None:
    root = data_root(runs["segformer"])
    args = [f"model={folders['segformer']}", f"+data.root={root}", "num_workers=0", "device=cpu", "progress=false"]
    done = subprocess.run(
        [sys.executable, "-m", "vss.eval", *args, f"hydra.run.dir={tmp_path}"],
        cwd=REPO_ROOT,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    written = json.loads((tmp_path / "metrics.json").read_text())
    direct = evaluate_checkpoint(eval_cfg(runs["segformer"], tmp_path / "direct"), tmp_path / "direct")
    assert written["mIoU"] == direct["mIoU"] and written["per_class_iou"] == direct["per_class_iou"]
    bad = subprocess.run(
        [sys.executable, "-m", "vss.eval", "model=segformer"],
        cwd=REPO_ROOT,
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: model=segformer: no model folder or checkpoint file there (model= takes a folder written by "
        "vss.export format=folder, or a .ckpt; the model architecture is chosen when it is trained)"
    ]


# -- bad input: one line each --------------------------------------------------------------------------------------
def _drop(name: str) -> Callable[[Path], None]:
    return lambda f: (f / name).unlink()


def _reshape(f: Path) -> None:
    tensors = load_file(f / WEIGHTS)
    key = "aggregator.decode_head.linear_pred.weight"
    tensors[key] = torch.zeros(7, *tensors[key].shape[1:])
    save_file(tensors, str(f / WEIGHTS))


def _truncate(f: Path) -> None:
    data = (f / WEIGHTS).read_bytes()
    (f / WEIGHTS).write_bytes(data[: len(data) // 2])


def _edit_yaml(f: Path) -> None:
    config = yaml.safe_load((f / CONFIG).read_text())
    config["model"]["_target_"] = "os.system"
    (f / CONFIG).write_text(yaml.safe_dump(config))


def _edit_json(name: str, key: str, value: object) -> Callable[[Path], None]:
    def edit(f: Path) -> None:
        data = json.loads((f / name).read_text())
        data[key] = value
        (f / name).write_text(json.dumps(data))

    return edit


BAD = {
    "missing weights": (_drop(WEIGHTS), r"is a model folder missing: model\.safetensors not found"),
    "missing classes": (_drop(CLASSES), r"is a model folder missing: classes\.json not found"),
    "missing config": (_drop(CONFIG), r"is a model folder missing: config\.yaml not found"),
    "shape": (
        _reshape,
        r": model\.safetensors does not fit the model built with its config\.yaml: aggregator\.decode_head\."
        r"linear_pred\.weight is \(7, 16, 1, 1\) in the file, \(5, 16, 1, 1\) in the model",
    ),
    "truncated": (_truncate, r"model\.safetensors cannot be read \(damaged, truncated or not a safetensors file"),
    "garbage": (lambda f: (f / WEIGHTS).write_bytes(b"not a tensor file"), r"model\.safetensors cannot be read"),
    "target": (_edit_yaml, r"\(config\.yaml\): its config's model\._target_='os\.system' is refused"),
    "preprocessing": (
        _edit_json(PREPROCESSING, "size_divisor", 16),
        r"preprocessing\.json has size_divisor=16 but config\.yaml data\.size_divisor=32",
    ),
    "classes": (
        _edit_json(CLASSES, "classes", [{"id": 0, "name": "x", "color": [0, 0, 0]}]),
        r"classes\.json lists 1 classes .* data\.num_classes=5",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_folder_is_one_line_naming_the_file(case: str, folders: dict[str, Path], tmp_path: Path) -> None:
    damage, message = BAD[case]
    folder = copy_folder(folders["segformer"], tmp_path / "f")
    damage(folder)
    with pytest.raises(ConfigError, match=message) as info:
        load_module(folder)
    assert "\n" not in str(info.value) and f"ckpt_path={str(folder)!r}" in str(info.value)


def test_another_models_weights_are_named(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_folder(folders["mrcfa"], tmp_path / "f")
    shutil.copy(folders["segformer"] / WEIGHTS, folder / WEIGHTS)
    with pytest.raises(
        ConfigError,
        match=r": model\.safetensors does not fit the model built with its config\.yaml: "
        r"\d+ model tensors missing from it \(aggregator\.affinity_decoder",
    ):
        load_module(folder)


def test_a_directory_that_is_no_folder_and_init_from(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"is no model folder: config\.yaml, model\.safetensors, .* not found"):
        load_module(tmp_path)
    folder = copy_folder(folders["segformer"], tmp_path / "f")
    (folder / PREPROCESSING).unlink()
    cfg = compose_train([f"init_from={folder}"])
    GlobalHydra.instance().clear()
    with pytest.raises(ConfigError, match=rf"init_from={str(folder)!r} is a model folder missing: preprocessing"):
        check_stages(cfg)


def test_writing_is_atomic_and_refuses_to_overwrite(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    export_folder(runs["segformer"], out)
    before = {n: (out / n).read_bytes() for n in FILES}
    with pytest.raises(ConfigError, match=r"already holds model\.safetensors, config\.yaml, .*overwrite=true"):
        export_folder(runs["segformer"], out)

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(OSError):
        export_folder(runs["mrcfa"], out, "overwrite=true")
    assert {n: (out / n).read_bytes() for n in FILES} == before and sorted(p.name for p in out.iterdir()) == sorted(
        FILES
    ), "a failed export changed the folder or left temporary files"
