"""Tests for the embedded synthetic VSPW-layout dataset (vss.data.synthetic)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vss.data import synthetic
from vss.data.check import check_dataset
from vss.data.synthetic import (
    SYNTHETIC_CLASSES,
    SyntheticConfig,
    ensure_synthetic,
    generate,
    read_hidden,
    render_video,
)
from vss.data.vspw import LabelMap, read_pair, read_split

SMALL = dict(train_videos=3, val_videos=2, min_frames=10, max_frames=12, height=32, width=48)


def _files(root: Path) -> dict[str, bytes]:
    """All files under ``root`` by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def default_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default synthetic dataset (what the default training job uses)."""
    return ensure_synthetic(tmp_path_factory.mktemp("syn") / "default", progress=False)


def test_config_basics() -> None:
    cfg = SyntheticConfig()
    assert cfg.num_classes == len(SYNTHETIC_CLASSES) == 5
    assert SYNTHETIC_CLASSES[0] == "background"
    with pytest.raises(ValueError, match="object_classes"):
        SyntheticConfig(object_classes=99)
    with pytest.raises(ValueError, match="min_frames"):
        SyntheticConfig(min_frames=10, max_frames=5)
    with pytest.raises(TypeError, match="unknown synthetic dataset knobs"):
        ensure_synthetic("/nonexistent/never", not_a_knob=1)


def test_deterministic(tmp_path: Path) -> None:
    cfg = SyntheticConfig(**SMALL)
    a = _files(generate(tmp_path / "a", cfg, progress=False))
    b = _files(generate(tmp_path / "b", cfg, progress=False))
    assert a.keys() == b.keys()
    assert a == b
    c = _files(generate(tmp_path / "c", SyntheticConfig(**SMALL, seed=1), progress=False))
    frames = [k for k in a if "/origin/" in k]
    assert frames
    assert sum(a[k] != c.get(k) for k in frames) > len(frames) // 2
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_png_frames_equal_render(tmp_path: Path) -> None:
    cfg = SyntheticConfig(**SMALL, image_format="png")
    root = generate(tmp_path / "png", cfg, progress=False)
    video = render_video(cfg, "val", 1)
    (v,) = [v for v in read_split(root, "val") if v.name == video.name]
    assert [f.stem for f in v.frames] == list(video.stems)
    for t, (f, m) in enumerate(zip(v.frames, v.masks, strict=True)):
        img, raw = read_pair(f, m)
        assert f.suffix == ".png"
        np.testing.assert_array_equal(img, video.frames[t])
        np.testing.assert_array_equal(raw, video.masks[t])


def test_ensure_synthetic_cache(tmp_path: Path) -> None:
    root = tmp_path / "cached"
    assert ensure_synthetic(root, progress=False, **SMALL) == root.absolute()
    meta = root / "meta.json"
    frame = next((root / "data").rglob("*.jpg"))
    stamp = (meta.stat().st_mtime_ns, frame.stat().st_mtime_ns)
    before = _files(root)
    ensure_synthetic(root, progress=False, **SMALL)
    assert (meta.stat().st_mtime_ns, frame.stat().st_mtime_ns) == stamp
    # a changed knob regenerates
    ensure_synthetic(root, progress=False, **{**SMALL, "seed": 7})
    assert json.loads(meta.read_text())["knobs"]["seed"] == 7
    assert _files(root) != before
    # a changed generator version regenerates
    data = json.loads(meta.read_text())
    data["version"] = "0-old"
    meta.write_text(json.dumps(data))
    ensure_synthetic(root, progress=False, **{**SMALL, "seed": 7})
    assert json.loads(meta.read_text())["version"] == synthetic.GENERATOR_VERSION
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_refuses_to_overwrite_foreign_directory(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        ensure_synthetic(root, progress=False, **SMALL)
    assert (root / "precious.txt").read_text() == "keep me"


def test_interrupted_generation_leaves_old_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = ensure_synthetic(tmp_path / "ds", progress=False, **SMALL)
    before = _files(root)
    calls = []

    def boom(*args: object) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_video", boom)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(root, progress=False, **{**SMALL, "seed": 3})
    assert _files(root) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.tmp")]
    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        ensure_synthetic(tmp_path / "fresh", progress=False, **SMALL)
    assert not (tmp_path / "fresh").exists()


def test_concurrent_ensure(tmp_path: Path) -> None:
    root = tmp_path / "race"
    code = (
        "import sys, json; from vss.data.synthetic import ensure_synthetic; "
        f"ensure_synthetic(sys.argv[1], progress=False, **json.loads({json.dumps(json.dumps(SMALL))}))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root)]) for _ in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    assert check_dataset(root, ["train", "val"], LabelMap(5)) == []
    reference = _files(generate(tmp_path / "ref", SyntheticConfig(**SMALL), progress=False))
    assert _files(root) == reference


def test_read_split_default(default_root: Path) -> None:
    cfg = SyntheticConfig()
    label_map = LabelMap(cfg.num_classes)
    for split in ("train", "val"):
        videos = read_split(default_root, split)
        assert len(videos) == cfg.num_videos(split)
        values = np.zeros(256, np.int64)
        for v in videos:
            assert cfg.min_frames <= len(v) <= cfg.max_frames
            for f, m in zip(v.frames, v.masks, strict=True):
                img, raw = read_pair(f, m)
                assert img.shape == (cfg.height, cfg.width, 3)
                label_map(raw, m)
                values += np.bincount(raw.ravel(), minlength=256)
        present = set(np.flatnonzero(values).tolist())
        assert present <= {0, 255, *range(1, cfg.num_classes + 1)}
        assert present == {0, 255, *range(1, cfg.num_classes + 1)}, f"{split}: every class, others and void"
        assert values[0] + values[255] < 0.05 * values.sum()
    assert check_dataset(default_root, ["train", "val"], label_map) == []


def test_hidden_schedule(default_root: Path) -> None:
    cfg = SyntheticConfig()
    n_hidden = n_total = 0
    for split in ("train", "val"):
        for i in range(cfg.num_videos(split)):
            video = render_video(cfg, split, i)
            info = read_hidden(default_root, video.name)
            assert info["frames"] == list(video.stems)
            n = len(video.stems)
            for k, obj in enumerate(info["objects"]):
                assert obj["raw_value"] == video.classes[k]
                hidden = set(obj["hidden"])
                assert hidden == set(np.flatnonzero(video.hidden[:, k]).tolist())
                assert set(info["storm"]) <= hidden
                for t in hidden:  # recoverable from t-3/t-6 (and t+3/t+6 for reversed clips)
                    assert any(t - d >= 0 and t - d not in hidden for d in (3, 6, 9)), (video.name, k, t)
                    assert any(t + d < n and t + d not in hidden for d in (3, 6, 9)), (video.name, k, t)
                n_hidden += len(hidden)
                n_total += n
    assert 0.1 < n_hidden / n_total < 0.4


def _object_means(root: Path, split: str, cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (frame, object) mean RGB over the object's interior pixels, its class and hidden flag."""
    feats, labels, hidden = [], [], []
    for v in read_split(root, split):
        video = render_video(cfg, split, int(v.name.split("_")[-1]))
        for t, (f, m) in enumerate(zip(v.frames, v.masks, strict=True)):
            img, _ = read_pair(f, m)
            inst = video.instances[t]
            for k, raw in enumerate(video.classes):
                own = inst == k
                interior = own.copy()  # erode by one pixel (4-neighbourhood)
                interior[1:] &= own[:-1]
                interior[:-1] &= own[1:]
                interior[:, 1:] &= own[:, :-1]
                interior[:, :-1] &= own[:, 1:]
                if interior.sum() < 12:
                    continue
                feats.append(img[interior].mean(axis=0))
                labels.append(raw)
                hidden.append(video.hidden[t, k])
    return np.array(feats), np.array(labels), np.array(hidden)


def _nearest_centroid(x_fit: np.ndarray, y_fit: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Predict with a nearest-centroid classifier fitted on (x_fit, y_fit)."""
    classes = np.unique(y_fit)
    cents = np.stack([x_fit[y_fit == c].mean(axis=0) for c in classes])
    return classes[np.argmin(((x[:, None, :] - cents[None]) ** 2).sum(-1), axis=1)]


def test_cue_needs_temporal_context(default_root: Path) -> None:
    """Colour separates the classes on visible frames and is at chance on hidden frames."""
    cfg = SyntheticConfig()
    x_tr, y_tr, h_tr = _object_means(default_root, "train", cfg)
    x_va, y_va, h_va = _object_means(default_root, "val", cfg)
    assert h_tr.sum() > 100 and h_va.sum() > 30

    # visible frames: fit on train, test on val -> (near) perfect
    pred = _nearest_centroid(x_tr[~h_tr], y_tr[~h_tr], x_va[~h_va])
    assert (pred == y_va[~h_va]).mean() > 0.99

    # hidden frames: a classifier fitted on hidden train objects is at chance on hidden val objects
    pred = _nearest_centroid(x_tr[h_tr], y_tr[h_tr], x_va[h_va])
    chance = np.bincount(y_va[h_va]).max() / h_va.sum()  # best constant guess
    assert (pred == y_va[h_va]).mean() < max(0.45, chance + 0.1)
    # ... and the class-conditional mean colours of hidden objects nearly coincide
    means = np.stack([x_tr[h_tr & (y_tr == c)].mean(axis=0) for c in np.unique(y_tr[h_tr])])
    spread_hidden = np.abs(means - means.mean(axis=0)).max()
    vis_means = np.stack([x_tr[~h_tr & (y_tr == c)].mean(axis=0) for c in np.unique(y_tr)])
    spread_visible = np.abs(vis_means - vis_means.mean(axis=0)).max()
    assert spread_hidden < 8 < 60 < spread_visible


def test_shape_and_size_independent_of_class() -> None:
    cfg = SyntheticConfig(train_videos=40)
    shapes: dict[int, set[str]] = {}
    for i in range(cfg.train_videos):
        video = render_video(cfg, "train", i)
        for raw, shape in zip(video.classes, video.shapes, strict=True):
            shapes.setdefault(raw, set()).add(shape)
    assert all(s == set(synthetic.SHAPES) for s in shapes.values())
