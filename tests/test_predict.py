"""``python -m vss.predict``: masks, overlay videos and errors, checked against the model's own clip path."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from conftest import REPO_ROOT, compose_job
from random_weights import write_tiny_checkpoints
from vss.config import CONF_DIR, register_resolvers
from vss.data import cityscapes
from vss.data.synthetic import OBJECT_PALETTE
from vss.data.transforms import build_eval_transform
from vss.errors import ConfigError, friendly_errors
from vss.lit import build_module
from vss.outputs import load_palette
from vss.predict import predict
from vss.sources import open_source

VIDEO_FRAMES, VIDEO_HW = 12, (48, 80)
FOLDER_HW = (50, 66)
SYNTHETIC_COLOURS = np.array([(128, 128, 128), *list(OBJECT_PALETTE.values())[:4]], np.uint8)
"""The synthetic set's class colours: background grey, then red, green, blue, yellow (vss.data.synthetic)."""


def moving_shapes(n: int, hw: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """``n`` RGB frames of a square and a disc moving over a noisy background."""
    rng = np.random.default_rng(seed)
    h, w = hw
    frames = []
    for i in range(n):
        f = rng.integers(30, 90, (h, w, 3), dtype=np.uint8)
        cv2.rectangle(f, (3 + 3 * i, h // 5), (3 + 3 * i + w // 4, h // 5 + h // 3), (230, 40, 40), -1)
        cv2.circle(f, (w - 12 - 2 * i, h - 14), min(h, w) // 5, (40, 220, 60), -1)
        frames.append(f)
    return frames


def read_video(path: Path) -> tuple[list[np.ndarray], float]:
    """Every frame of a video as RGB, and its frame rate."""
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return frames, fps


def read_mask(path: Path) -> np.ndarray:
    """An 8-bit class-id PNG."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert mask is not None and mask.dtype == np.uint8 and mask.ndim == 2, path
    return mask


def compose_predict(*overrides: str) -> DictConfig:
    """``conf/predict.yaml`` composed in-process (no progress bar)."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="predict", overrides=["progress=false", *overrides])
    GlobalHydra.instance().clear()
    return cfg


def run_predict(*overrides: str) -> dict:
    """:func:`vss.predict.predict` on a composed config."""
    return predict(compose_predict(*overrides))


def build_segmenter(ckpt_path: Path) -> tuple[torch.nn.Module, DictConfig]:
    """The checkpoint's segmenter rebuilt independently of vss.predict, and its training config."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    module = build_module(cfg, cfg.data.num_classes, list(cfg.data.class_names))
    module.load_state_dict(ckpt["state_dict"])
    return module.segmenter.eval(), cfg


@torch.no_grad()
def reference_masks(ckpt_path: Path, frames: list[np.ndarray]) -> list[np.ndarray]:
    """Per-frame predictions through the clip path ``segmenter(clip)`` with the model's own references."""
    segmenter, cfg = build_segmenter(ckpt_path)
    x = build_eval_transform(cfg.data.scale, cfg.data.size_divisor)(images=np.stack(frames))["images"]
    n, size = len(frames), frames[0].shape[:2]
    masks = []
    for t in range(n):
        clip = x[[*segmenter.references(t, n), t]][None]
        logits = segmenter(clip)["logits"]
        masks.append(F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)[0].numpy())
    return masks


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight checkpoints in the vss.train layout: SegFormer and MRCFA (references, start policy)."""
    root = tmp_path_factory.mktemp("predict-ckpts")
    return write_tiny_checkpoints(root, {m: [f"model={m}"] for m in ("segformer", "mrcfa")}, 64)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-frame 48x80 mp4 (mp4v, 10 fps) of moving shapes."""
    path = tmp_path_factory.mktemp("predict-src") / "clip.mp4"
    h, w = VIDEO_HW
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (w, h))
    for f in moving_shapes(VIDEO_FRAMES, VIDEO_HW):
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.mark.parametrize("model", ["segformer", "mrcfa"])
def test_video_masks_equal_the_model(model: str, ckpts: dict[str, Path], video: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run_predict(f"ckpt_path={ckpts[model]}", f"source={video}", f"output={out}", "side_by_side=true")
    names = sorted(p.name for p in (out / "masks").iterdir())
    assert names == [f"{i:06d}.png" for i in range(VIDEO_FRAMES)]
    masks = [read_mask(out / "masks" / n) for n in names]
    assert all(m.shape == VIDEO_HW and m.max() < 5 for m in masks)

    frames, _ = read_video(video)  # the same decoded frames vss.predict saw
    expected = reference_masks(ckpts[model], frames)
    assert len(np.unique(np.stack(expected))) > 1, "the test model predicts a single class: the check is void"
    equal = np.mean([np.mean(m == e) for m, e in zip(masks, expected, strict=True)])
    assert equal > 0.999, f"{model}: only {equal:.5f} of the pixels equal the clip-path predictions"

    overlay, fps = read_video(out / "overlay.mp4")
    assert len(overlay) == VIDEO_FRAMES and overlay[0].shape == (*VIDEO_HW, 3) and fps == pytest.approx(10)
    colours = SYNTHETIC_COLOURS  # the data's palette, as the training overlays draw it
    blended = cv2.addWeighted(frames[5], 0.5, colours[masks[5]], 0.5, 0.0)
    assert np.abs(overlay[5].astype(int) - blended).mean() < 12  # mp4v is lossy
    side, _ = read_video(out / "side_by_side.mp4")  # frame | overlay, a legend strip under them
    assert len(side) == VIDEO_FRAMES and side[0].shape[1:] == (2 * VIDEO_HW[1], 3) and side[0].shape[0] > VIDEO_HW[0]
    assert np.abs(side[5][: VIDEO_HW[0], VIDEO_HW[1] :].astype(int) - blended).mean() < 12

    assert summary["frames"] == VIDEO_FRAMES and summary["overlay"] == str(out / "overlay.mp4")
    assert json.loads((out / "predict.json").read_text())["classes"][1]["name"] == "red"
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


def flicker_of(masks: list[np.ndarray]) -> float:
    """Changed over compared pixels between consecutive masks, recomputed here from the written PNGs."""
    pairs = list(zip(masks, masks[1:], strict=False))
    return sum(int((a != b).sum()) for a, b in pairs) / sum(b.size for _, b in pairs)


def test_folder_of_frames(ckpts: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "frames"
    src.mkdir()
    frames = moving_shapes(5, FOLDER_HW, seed=3)
    names = ["f1", "f2", "f10", "f11", "f3"]  # natural order: f1 f2 f3 f10 f11
    for name, f in zip(names, frames, strict=True):
        cv2.imwrite(str(src / f"{name}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    big = cv2.resize(frames[0], (90, 70))
    cv2.imwrite(str(src / "f12.jpg"), cv2.cvtColor(big, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    (src / "notes.txt").write_text("not a frame")
    palette = tmp_path / "palette.yaml"
    palette.write_text("- [0, 0, 0]\n- [255, 0, 0]\n- [0, 255, 0]\n- [0, 0, 255]\n- [255, 255, 0]\n")
    out = tmp_path / "out"
    summary = run_predict(
        f"ckpt_path={ckpts['mrcfa']}",
        f"source={src}",
        f"output={out}",
        f"palette={palette}",
        "opacity=1.0",
        "fps=7",
        "batch_size=2",
    )
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == sorted([*names, "f12"])
    masks = {n: read_mask(out / "masks" / f"{n}.png") for n in names}
    assert all(m.shape == FOLDER_HW and m.max() < 5 for m in masks.values())
    assert read_mask(out / "masks" / "f12.png").shape == (70, 90)  # each mask at its own frame's size

    order = ["f1", "f2", "f3", "f10", "f11"]
    # flicker over the processed order; f12 (70x90, last) is not compared with f11 (another size)
    flicker = summary["flicker"]
    assert flicker["compared_pixels"] == 4 * FOLDER_HW[0] * FOLDER_HW[1]
    assert flicker["pooled"] == pytest.approx(flicker_of([masks[n] for n in order]))
    assert flicker["per_video"] == {"frames": flicker["pooled"]}
    by_name = dict(zip(names, frames, strict=True))
    expected = reference_masks(ckpts["mrcfa"], [by_name[n] for n in order])
    equal = np.mean([np.mean(masks[n] == e) for n, e in zip(order, expected, strict=True)])
    assert equal > 0.999, f"only {equal:.5f} of the pixels equal the clip-path predictions (natural frame order)"

    overlay, fps = read_video(out / "overlay.mp4")
    assert len(overlay) == 6 and overlay[0].shape == (*FOLDER_HW, 3) and fps == pytest.approx(7)
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
    assert np.abs(overlay[0].astype(int) - colours[masks["f1"]]).mean() < 12  # opacity 1: the palette only
    assert not (out / "side_by_side.mp4").exists()


def test_overwrite_and_save_overlay(ckpts: dict[str, Path], tmp_path: Path) -> None:
    image = tmp_path / "one.png"
    cv2.imwrite(str(image), moving_shapes(1, (33, 47))[0])  # odd sides: the video is padded for mp4v
    out = tmp_path / "out"
    args = (f"ckpt_path={ckpts['segformer']}", f"source={image}", f"output={out}")
    one = run_predict(*args)
    assert read_mask(out / "masks" / "one.png").shape == (33, 47)
    assert one["flicker"] == {"pooled": None, "per_video": {"one.png": None}, "changed_pixels": 0, "compared_pixels": 0}
    overlay, _ = read_video(out / "overlay.mp4")
    assert len(overlay) == 1 and overlay[0].shape == (34, 48, 3)
    with pytest.raises(ConfigError, match="already holds predictions.*overwrite=true"):
        run_predict(*args)
    summary = run_predict(*args, "overwrite=true", "save_overlay=false")
    assert summary["overlay"] is None and not (out / "overlay.mp4").exists()
    assert (out / "masks" / "one.png").is_file() and (out / "predict.json").is_file()


def _folder_with_a_bad_frame(tmp_path: Path) -> Path:
    """4 frames as PNGs, the third not an image."""
    src = tmp_path / "frames"
    src.mkdir()
    for i, f in enumerate(moving_shapes(4, FOLDER_HW)):
        cv2.imwrite(str(src / f"{i:03d}.png"), f)
    (src / "002.png").write_bytes(b"not a png")
    return src


def test_crash_leaves_no_video(ckpts: dict[str, Path], tmp_path: Path) -> None:
    src = _folder_with_a_bad_frame(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"002\.png.*not a readable image"):
        run_predict(f"ckpt_path={ckpts['segformer']}", f"source={src}", f"output={out}", "batch_size=1")
    assert sorted(p.name for p in out.iterdir()) == ["masks"]  # no overlay.mp4, no predict.json, no partial file


ERRORS = {  # overrides ({root}: a folder of bad inputs, {ckpt}: a good checkpoint, {img}: a good image) -> message
    "no_ckpt": (["source={img}"], "ckpt_path is required"),
    "no_source": (["ckpt_path={ckpt}"], "source is required"),
    "missing_source": (["ckpt_path={ckpt}", "source={root}/nope.mp4"], "nope.mp4.*no such file"),
    "fake_video": (["ckpt_path={ckpt}", "source={root}/fake.mp4"], "fake.mp4.*not a readable video"),
    "empty_folder": (["ckpt_path={ckpt}", "source={root}/empty"], "empty.*no image files"),
    "other_ckpt": (["ckpt_path={root}/other.ckpt", "source={img}"], "other.ckpt.*not a vss checkpoint"),
    "garbage_ckpt": (["ckpt_path={root}/garbage.ckpt", "source={img}"], "garbage.ckpt.*cannot be read"),
    "missing_ckpt": (["ckpt_path={root}/nope.ckpt", "source={img}"], "nope.ckpt.*does not exist"),
    "bad_palette": (["ckpt_path={ckpt}", "source={img}", "palette={root}/bad.json"], "bad.json.*at least 5"),
    "opacity": (["ckpt_path={ckpt}", "source={img}", "opacity=1.5"], "opacity=1.5 is invalid"),
    "batch_size": (["ckpt_path={ckpt}", "source={img}", "batch_size=0"], "batch_size=0 is invalid"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_name_the_culprit(case: str, ckpts: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "fake.mp4").write_text("hello, not a video")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no frames here")
    torch.save({"a": 1}, tmp_path / "other.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"\x00garbage bytes")
    (tmp_path / "bad.json").write_text("[[0, 0, 0], [1, 2]]")
    img = tmp_path / "img.png"
    cv2.imwrite(str(img), np.zeros((8, 8, 3), np.uint8))
    templates, message = ERRORS[case]
    args = [t.format(root=tmp_path, ckpt=ckpts["segformer"], img=img) for t in templates]
    with pytest.raises(ConfigError, match=message):
        run_predict(*args, f"output={tmp_path / 'out'}")
    assert not (tmp_path / "out" / "predict.json").exists()


def test_cli(ckpts: dict[str, Path], video: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """``python -m vss.predict`` into the Hydra run directory; prints one summary line."""
    cmd = [
        sys.executable,
        "-m",
        "vss.predict",
        f"ckpt_path={ckpts['segformer']}",
        f"source={video}",
        "side_by_side=true",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=cli_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("[vss.predict]")]
    assert len(line) == 1 and line[0].startswith("[vss.predict] backend=eager on "), proc.stdout
    assert f": {VIDEO_FRAMES} frames in " in line[0], proc.stdout
    (summary,) = (tmp_path / "logs" / "predict" / "runs").glob("*/predict.json")
    run_dir = summary.parent
    masks = [read_mask(p) for p in sorted((run_dir / "masks").glob("*.png"))]
    flicker = json.loads(summary.read_text())["flicker"]
    assert flicker["pooled"] == pytest.approx(flicker_of(masks)) and 0 < flicker["pooled"] < 1
    assert flicker["per_video"] == {video.name: flicker["pooled"]}
    assert line[0].endswith(f"after the first frame), flicker {flicker['pooled']:.4f} -> {run_dir}")
    assert len(list((run_dir / "masks").glob("*.png"))) == VIDEO_FRAMES
    assert (run_dir / "overlay.mp4").is_file() and (run_dir / "side_by_side.mp4").is_file()


def test_fake_video_is_one_line_exit_2(ckpts: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """The entry point's error path: exit code 2 and a single stderr line (FFmpeg's own complaint folded in)."""
    (tmp_path / "fake.mp4").write_text("hello, not a video")
    cfg = compose_predict(f"ckpt_path={ckpts['segformer']}", f"source={tmp_path / 'fake.mp4'}", f"output={tmp_path}")
    with pytest.raises(SystemExit) as exit_info:
        friendly_errors(predict)(cfg)
    assert exit_info.value.code == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1, f"expected one line, got:\n{err}"
    assert err.startswith("error: source=") and "fake.mp4" in err and "not a readable video" in err


def test_load_palette_default_and_file(tmp_path: Path) -> None:
    assert load_palette(None, 3).shape == (3, 3)
    path = tmp_path / "p.json"
    path.write_text(json.dumps([[1, 2, 3], [4, 5, 6], [7, 8, 9]]))
    assert load_palette(path, 2).tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ConfigError, match="does not exist"):
        load_palette(tmp_path / "missing.yaml", 2)


def test_output_null_needs_the_entry_point(video: Path) -> None:
    with pytest.raises(ConfigError, match="output=null means the run directory"):
        run_predict("ckpt_path=any.ckpt", f"source={video}")


# -- class names and colours: the data's, with a legend ------------------------------------------------
def swatch_pixels(image: np.ndarray, colour: Sequence[int]) -> int:
    """How many pixels of ``image`` (RGB) have exactly ``colour``."""
    return int(np.all(image == np.asarray(colour, np.uint8), axis=-1).sum())


def test_synthetic_red_is_drawn_red(ckpts: dict[str, Path], video: Path, tmp_path: Path) -> None:
    """The synthetic checkpoint's config leaves data.palette null: its data module's colours are used (class
    ``red`` in red, not the generated palette's green), and legend.png shows the classes predicted."""
    out = tmp_path / "out"
    summary = run_predict(f"ckpt_path={ckpts['segformer']}", f"source={video}", f"output={out}", "opacity=1.0")
    classes = json.loads((out / "predict.json").read_text())["classes"]
    assert [c["name"] for c in classes] == ["background", "red", "green", "blue", "yellow"]
    assert [c["color"] for c in classes] == SYNTHETIC_COLOURS.tolist()
    assert classes[1]["color"] == [220, 45, 45]

    masks = np.stack([read_mask(p) for p in sorted((out / "masks").glob("*.png"))])
    overlay, _ = read_video(out / "overlay.mp4")
    red = masks == 1
    assert red.sum() > 200, "the test model predicts too little of class red: the check is void"
    drawn = np.stack(overlay)[red].astype(int)  # opacity 1: the class colour only (mp4v is lossy)
    assert np.abs(drawn - [220, 45, 45]).mean() < 20 and (drawn[:, 0] > drawn[:, 1] + 100).mean() > 0.95

    counts = np.bincount(masks.ravel(), minlength=5)
    assert [c["pixels"] for c in classes] == counts.tolist()
    legend = cv2.cvtColor(cv2.imread(str(out / "legend.png")), cv2.COLOR_BGR2RGB)
    assert summary["legend"] == str(out / "legend.png")
    for c in range(5):  # a 15x15 swatch per class predicted, none for the others
        assert (swatch_pixels(legend, SYNTHETIC_COLOURS[c]) >= 15 * 15) == (counts[c] > 0), c


def test_cityscapes_checkpoint_names_its_classes(tmp_path: Path) -> None:
    """A Cityscapes checkpoint (data.class_names and data.palette null, no data.root, as vss.convert writes
    one): predict.json names road, sidewalk, ... in the Cityscapes colours; no data file is read."""
    cfg = compose_job(
        [
            "data=cityscapes_video",
            "model=segformer",
            "encoder=mit_b0",
            "model.embed_dim=16",
            "data.scale=[64,32]",
            f"paths.output_dir={tmp_path}",
        ]
    )
    assert OmegaConf.is_missing(cfg.data, "root") and cfg.data.class_names is None and cfg.data.palette is None
    module = build_module(cfg, 19, [str(i) for i in range(19)])
    ckpt = tmp_path / "cityscapes.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": OmegaConf.to_container(cfg)}}, ckpt)
    image = tmp_path / "street.png"
    cv2.imwrite(str(image), moving_shapes(1, (32, 64))[0])
    run_predict(f"ckpt_path={ckpt}", f"source={image}", f"output={tmp_path / 'out'}")
    classes = json.loads((tmp_path / "out" / "predict.json").read_text())["classes"]
    assert [c["name"] for c in classes][:3] == ["road", "sidewalk", "building"]
    assert [c["name"] for c in classes] == list(cityscapes.CLASSES)
    assert [c["color"] for c in classes] == [list(c) for c in cityscapes.PALETTE]


# -- damaged videos --------------------------------------------------------------------------------------
DAMAGED_FRAMES = 24


def write_video(path: Path, fourcc: str, frames: list[np.ndarray]) -> Path:
    """``frames`` (RGB) as a 10 fps video."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (w, h))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def plain_read(path: Path) -> tuple[list[bool], list[np.ndarray]]:
    """OpenCV's own reading: ok/failed for each of ``2 x DAMAGED_FRAMES`` reads, and the frames read."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_ANY, [cv2.CAP_PROP_N_THREADS, 1])
    oks, frames = [], []
    for _ in range(2 * DAMAGED_FRAMES):
        ok, bgr = cap.read()
        oks.append(ok)
        if ok:
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return oks, frames


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``middle``: an mp4 (mp4v) whose bytes 30-60% are zeroed (some frames decode, then decoding fails, then
    it goes on); ``truncated``: an MJPG avi cut at half its size (it ends before its declared frame count)."""
    root = tmp_path_factory.mktemp("damaged")
    frames = moving_shapes(DAMAGED_FRAMES, VIDEO_HW, seed=5)
    good_mp4 = write_video(root / "good.mp4", "mp4v", frames)
    data = bytearray(good_mp4.read_bytes())
    a, b = int(0.3 * len(data)), int(0.6 * len(data))
    data[a:b] = bytes(b - a)
    (root / "middle.mp4").write_bytes(bytes(data))
    good_avi = write_video(root / "good.avi", "MJPG", frames)
    (root / "truncated.avi").write_bytes(good_avi.read_bytes()[: good_avi.stat().st_size // 2])
    return {"middle": root / "middle.mp4", "truncated": root / "truncated.avi", "frames": root / "good.mp4"}


def original_index(frame: np.ndarray, originals: list[np.ndarray]) -> int:
    """The index of the undamaged frame ``frame`` shows (the nearest one)."""
    return int(np.argmin([np.abs(frame.astype(int) - o).mean() for o in originals]))


def test_damaged_video_is_one_line_naming_the_frame(
    ckpts: dict[str, Path], damaged: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """A read failure mid-video: exit 2, one line naming the source and the first frame lost, no FFmpeg lines."""
    oks, _ = plain_read(damaged["middle"])
    first_bad = oks.index(False)
    assert first_bad > 0 and any(oks[first_bad:]), "the damaged file does not fail mid-video: the check is void"
    cfg = compose_predict(f"ckpt_path={ckpts['segformer']}", f"source={damaged['middle']}", f"output={tmp_path}")
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        friendly_errors(predict)(cfg)
    assert exit_info.value.code == 2
    out, err = capfd.readouterr()
    assert len(err.strip().splitlines()) == 1, f"expected one line, got:\n{err}"
    assert err.startswith(f"error: source={str(damaged['middle'])!r}: frames {first_bad:06d}-")
    assert "cannot be decoded" in err and "on_error=skip" in err
    assert "@ 0x" not in out + err and "Traceback" not in err
    assert not (tmp_path / "predict.json").exists() and not (tmp_path / "overlay.mp4").exists()


def test_damaged_video_skipped_and_counted(
    ckpts: dict[str, Path],
    damaged: dict[str, Path],
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``on_error=skip``: the frames after the damage are predicted under their own index in the video (their
    content says which), the lost ones counted in predict.json and the summary line; FFmpeg says nothing."""
    oks, read = plain_read(damaged["middle"])
    originals = plain_read(damaged["frames"])[1]
    lost = DAMAGED_FRAMES - len(read)
    assert 0 < lost < DAMAGED_FRAMES - 4
    out = tmp_path / "out"
    capfd.readouterr()
    summary = run_predict(
        f"ckpt_path={ckpts['mrcfa']}", f"source={damaged['middle']}", f"output={out}", "on_error=skip"
    )
    stdout, err = capfd.readouterr()
    names = sorted(int(p.stem) for p in (out / "masks").glob("*.png"))
    assert len(names) == len(read) == summary["frames"] and names[-1] == DAMAGED_FRAMES - 1
    concealed = [int(n) for n in summary["read"]["decoded_with_errors"]]
    for name, frame in zip(names, read, strict=True):  # decode order; a clean frame shows the original it names
        diffs = [np.abs(frame.astype(int) - o).mean() for o in originals]
        if name not in concealed:
            assert int(np.argmin(diffs)) == name and min(diffs) < 5, (name, min(diffs))
    missing = sorted(set(range(DAMAGED_FRAMES)) - set(names))
    assert missing == list(range(missing[0], missing[0] + lost)) and missing[0] > 0

    assert summary["skipped"] == lost and summary["read"]["declared_frames"] == DAMAGED_FRAMES
    (gap,) = summary["read"]["skipped_frames"]
    assert (gap["first"], gap["last"], gap["count"]) == (f"{missing[0]:06d}", f"{missing[-1]:06d}", lost)
    assert json.loads((out / "predict.json").read_text())["skipped"] == lost
    assert f"{len(read)} frames in " in stdout and f", {lost} skipped (unreadable: frames {missing[0]:06d}-" in stdout
    assert f"{lost} frames skipped so far" in caplog.text  # the warning, counted
    assert "@ 0x" not in stdout + err and "marker" not in err, f"FFmpeg's own lines reached the terminal:\n{err}"
    assert len(read_video(out / "overlay.mp4")[0]) == len(read)


def test_truncated_video_ends_before_its_frame_count(
    ckpts: dict[str, Path], damaged: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """An avi cut short: its header still declares every frame; the run says where it ends and how many are
    missing (an error by default, counted with on_error=skip)."""
    oks, read = plain_read(damaged["truncated"])
    assert 0 < len(read) < DAMAGED_FRAMES and not any(oks[len(read) :]), "not a truncated file: the check is void"
    args = (f"ckpt_path={ckpts['segformer']}", f"source={damaged['truncated']}", f"output={tmp_path / 'out'}")
    capfd.readouterr()
    with pytest.raises(ConfigError) as error:
        run_predict(*args)
    assert f"frames {len(read):06d}-{DAMAGED_FRAMES - 1:06d} ({DAMAGED_FRAMES - len(read)}) cannot be read" in str(
        error.value
    )
    assert f"before the {DAMAGED_FRAMES} frames its container declares" in str(error.value)
    summary = run_predict(*args, "on_error=skip", "overwrite=true")
    assert summary["frames"] == len(read) and summary["skipped"] == DAMAGED_FRAMES - len(read)
    assert "@ 0x" not in "".join(capfd.readouterr()), "FFmpeg's own lines reached the terminal"


def test_folder_frame_skipped(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """``on_error=skip`` on a folder: an unreadable frame file is skipped and counted."""
    src = _folder_with_a_bad_frame(tmp_path)
    out = tmp_path / "out"
    summary = run_predict(f"ckpt_path={ckpts['segformer']}", f"source={src}", f"output={out}", "on_error=skip")
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == ["000", "001", "003"]
    assert summary["skipped"] == 1 and summary["read"]["skipped_frames"][0]["first"] == "002"


def test_ffmpeg_messages_stay_off_the_terminal(damaged: dict[str, Path], capfd: pytest.CaptureFixture) -> None:
    """Reading the damaged video over and over (no model): every FFmpeg message is kept, none reaches fd 2.
    (FFmpeg's decoding threads log after a read has returned: with more than one, some lines escape, about
    one read in ten of this file.)"""
    counts = []
    capfd.readouterr()
    for _ in range(30):
        source = open_source(damaged["middle"], on_error="skip")
        frames = [name for name, _ in source.frames]
        assert len(frames) == DAMAGED_FRAMES - source.report.skipped
        counts.append(source.report.message_count)
    out, err = capfd.readouterr()
    assert err == "" and "@ 0x" not in out, f"FFmpeg's own lines reached the terminal:\n{err}"
    assert counts[0] > 0 and len(set(counts)) == 1, counts  # every message captured, every time
