"""Issue 28 item 5: the validation files are fully checked before training (``data.check_val``), within a size
bound; a validation that still fails inside training saves ``last.ckpt`` first."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from conftest import TINY_DATA, compose_train
from fake_video_datasets import write_camvid, write_cityscapes
from vss.callbacks import SaveOnValidationError
from vss.data.camvid import CamVidVideoDataModule
from vss.data.cityscapes import CityscapesVideoDataModule
from vss.data.datamodule import SyntheticDataModule, VSSDataModule
from vss.data.vspw import DatasetError
from vss.errors import worker_error_message

KW: dict[str, Any] = {"num_classes": 2, "clip": {"offsets": []}, "num_workers": 0}


def _vspw(root: Path, val_videos: tuple[str, ...] = ("b", "c"), frames: int = 3) -> Path:
    """Train video ``a`` and the val videos, ``frames`` 8x8 PNG frames each with masks of value 1 (class 0)."""
    root.mkdir(parents=True)
    for split, videos in (("train", ("a",)), ("val", val_videos)):
        (root / f"{split}.txt").write_text("".join(f"{v}\n" for v in videos))
        for video in videos:
            for sub in ("origin", "mask"):
                (root / "data" / video / sub).mkdir(parents=True)
            for t in range(frames):
                cv2.imwrite(str(root / "data" / video / "origin" / f"{t:05d}.png"), np.full((8, 8, 3), 40, np.uint8))
                cv2.imwrite(str(root / "data" / video / "mask" / f"{t:05d}.png"), np.ones((8, 8), np.uint8))
    return root


def truncate(path: Path) -> Path:
    """Cut an encoded image in half (its end marker gone)."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def relabel(path: Path, value: int) -> Path:
    """Set one pixel of a label PNG to ``value`` (same size, still a valid PNG)."""
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    label[0, 0] = value
    assert cv2.imwrite(str(path), label)
    return path


def setup_error(module: VSSDataModule) -> str:
    with pytest.raises(DatasetError) as info:
        module.setup("fit")
    return str(info.value)


def test_a_truncated_val_png_stops_setup_in_one_line_naming_the_file(tmp_path: Path, capsys) -> None:
    root = _vspw(tmp_path / "d")
    VSSDataModule(root=str(root), **KW).setup("fit")
    assert "[vss] validation split 'val': 12 files read and checked in" in capsys.readouterr().out  # 2 x 3 x 2
    bad = truncate(root / "data" / "c" / "origin" / "00001.png")
    message = setup_error(VSSDataModule(root=str(root), **KW))
    assert message == (
        f"image {bad} is corrupt (truncated PNG: no IEND chunk); re-extract or re-download it; found by the check "
        "of validation split 'val' before training (data.check_val=auto, full)"
    )
    VSSDataModule(root=str(root), check_val="headers", **KW).setup("fit")  # its header is whole: headers miss it
    VSSDataModule(root=str(root), check_val="off", **KW).setup("fit")
    VSSDataModule(root=str(root), check_val_headers=False, **KW).setup("fit")  # a config stored before check_val


def test_a_wrong_label_id_in_val_stops_setup_naming_the_mask(tmp_path: Path) -> None:
    root = _vspw(tmp_path / "d")
    bad = relabel(root / "data" / "b" / "mask" / "00002.png", 7)  # 2 classes: raw values 0..2 and 255 only
    message = setup_error(VSSDataModule(root=str(root), **KW))
    assert message.startswith(f"{bad}: mask values [7] are outside the label map (allowed raw values: 0..2, 255)")
    assert "\n" not in message
    assert "data.check_val=full)" in setup_error(VSSDataModule(root=str(root), check_val="full", **KW))


def test_above_the_bound_only_headers_are_read_and_a_line_says_so(tmp_path: Path, capsys) -> None:
    root = _vspw(tmp_path / "d")
    relabel(root / "data" / "b" / "mask" / "00002.png", 7)
    size = sum(p.stat().st_size for p in (root / "data").glob("[bc]/*/*.png")) / 1e6
    VSSDataModule(root=str(root), check_val_max_mb=size * 0.99, **KW).setup("fit")  # the bad label is not seen
    note = capsys.readouterr().out.strip()
    assert note == (
        f"[vss] validation split 'val': 12 files, {size:.1f} MB ({size:.1f} MB per process) exceed "
        f"data.check_val_max_mb={size * 0.99:g}: headers checked only; data.check_val=full reads every pixel before "
        "training"
    )
    assert "0..2, 255" in setup_error(VSSDataModule(root=str(root), check_val_max_mb=size * 1.01, **KW))
    assert "0..2, 255" in setup_error(VSSDataModule(root=str(root), check_val="full", check_val_max_mb=1e-9, **KW))
    # what headers do see, they still stop the run (a mask whose size differs from its frame's)
    cv2.imwrite(str(root / "data" / "c" / "mask" / "00000.png"), np.ones((4, 8), np.uint8))
    message = setup_error(VSSDataModule(root=str(root), check_val_max_mb=1e-9, **KW))
    assert message.endswith("they must match; found by the check of validation split 'val' before training "
                            "(data.check_val=auto, headers)")  # fmt: skip


def test_several_broken_files_are_one_line_each_and_the_train_split_is_not_read(tmp_path: Path) -> None:
    root = _vspw(tmp_path / "d")
    truncate(root / "data" / "a" / "origin" / "00000.png")  # training: found when read (data.verify reads it)
    VSSDataModule(root=str(root), **KW).setup("fit")
    masks = [relabel(root / "data" / v / "mask" / "00001.png", 9) for v in ("b", "c")]
    lines = setup_error(VSSDataModule(root=str(root), **KW)).splitlines()
    assert lines[0] == (
        f"2 problems in {root}, found by the check of validation split 'val' before training (data.check_val=auto, "
        "full):"
    )
    assert [line.split(":")[0] for line in lines[1:]] == [str(m) for m in masks]


def test_cityscapes_checks_the_frames_validation_reads(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "cs", size=(16, 32))
    seq = root / "leftImg8bit_sequence" / "val" / "frankfurt"
    kw = {"clip": {"offsets": [-1]}, "num_workers": 0}
    truncate(seq / "frankfurt_000000_000289_leftImg8bit.png")  # not a frame of the clips (294 and 293)
    CityscapesVideoDataModule(root=str(root), **kw).setup("fit")
    bad = truncate(seq / "frankfurt_000000_000293_leftImg8bit.png")
    assert setup_error(CityscapesVideoDataModule(root=str(root), **kw)).startswith(f"image {bad} is corrupt")
    shutil.copy(seq / "frankfurt_000000_000294_leftImg8bit.png", bad)
    label = relabel(root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelIds.png", 77)
    message = setup_error(CityscapesVideoDataModule(root=str(root), **kw))
    assert message.startswith(f"{label}: label values [77] are not Cityscapes ids") and "\n" not in message


def test_camvid_checks_the_pieces_around_its_labels(tmp_path: Path) -> None:
    root = write_camvid(tmp_path / "cv", size=(12, 16))
    frames = root / "frames" / "0016E5"
    kw = {"clip": {"offsets": [-1]}, "num_workers": 0}
    truncate(frames / "0016E5_000100.png")  # far from the val labels (frames 420 and 422)
    CamVidVideoDataModule(root=str(root), **kw).setup("fit")
    bad = truncate(frames / "0016E5_000419.png")  # the reference of frame 420
    assert setup_error(CamVidVideoDataModule(root=str(root), **kw)).startswith(f"image {bad} is corrupt")
    shutil.copy(frames / "0016E5_000418.png", bad)
    label = relabel(root / "labels" / "0016E5_00421.png", 50)
    message = setup_error(CamVidVideoDataModule(root=str(root), **kw))
    assert message.startswith(f"{label}: label values [50] are not CamVid ids") and "\n" not in message


def test_synthetic_checks_val_with_or_without_data_verify(tmp_path: Path, tiny_data_dir: Path) -> None:
    # the tiny set's own cache (other tests may add caches of other knobs to the same data dir)
    cached = Path(compose_train([*TINY_DATA, f"paths.data_dir={tiny_data_dir}"]).data.root)
    root = tmp_path / cached.name
    shutil.copytree(cached, root)
    knobs = json.loads((root / "meta.json").read_text())["knobs"]  # the cache's own: not generated again
    bad = relabel(sorted((root / "data" / "val_001" / "mask").iterdir())[3], 200)
    kw = {"synthetic": knobs, "clip": {"offsets": []}, "num_workers": 0}
    message = setup_error(SyntheticDataModule(root=str(root), verify=False, **kw))
    assert message.startswith(f"{bad}: mask values [200]") and message.endswith("(data.check_val=auto, full)")
    message = setup_error(SyntheticDataModule(root=str(root), verify=True, **kw))  # the preset's default
    assert message.startswith(f"{bad}: mask values [200]") and "\n" not in message
    assert message.endswith("found by data.verify=true (every file of split 'val' read before training)")


def _ddp_rank(rank: int, world: int, port: int, root: str, out: str) -> None:
    """One gloo rank: setup("fit") with a trainer of ``world`` processes; writes its error and what it checked."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    checked: list[str] = []
    try:
        module = VSSDataModule(root=root, **KW)
        module.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        report = module.check_report

        def recording(splits: Any, progress: bool = False, scan: Any = None) -> Any:
            checked.extend(v.name for v in scan(module.root, splits[0], []))
            return report(splits, progress, scan)

        module.check_report = recording  # type: ignore[method-assign]
        try:
            module.setup("fit")
            error = None
        except DatasetError as e:
            error = str(e)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"error": error, "checked": checked}))
    finally:
        dist.destroy_process_group()


def test_under_ddp_each_process_checks_its_videos_and_all_stop(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    root = _vspw(tmp_path / "d", val_videos=("b", "c", "e"), frames=2)
    bad = relabel(root / "data" / "e" / "mask" / "00001.png", 9)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the ranks start in a moment (a spawned interpreter would import torch and Lightning again)
    mp.start_processes(_ddp_rank, args=(2, port, str(root), str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(ranks[0]["checked"] + ranks[1]["checked"]) == ["b", "c", "e"]  # each video by one process
    assert ranks[0]["checked"] and ranks[1]["checked"]
    assert ranks[0]["error"] == ranks[1]["error"] and ranks[0]["error"].startswith(f"{bad}: mask values [9]")


def test_a_worker_error_is_shown_as_its_own_message() -> None:
    text = (
        "Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nvss.data.vspw.DatasetError: cannot read mask /d/m.png (image file is truncated)\n'
    )
    assert worker_error_message(text) == "cannot read mask /d/m.png (image file is truncated)"
    assert worker_error_message("cannot read mask /d/m.png") == "cannot read mask /d/m.png"


class _Checkpoints:
    def dump_checkpoint(self) -> dict[str, Any]:
        return {"global_step": 7}


def _trainer(fn: str = "fit", validating: bool = True, sanity: bool = False, step: int = 7) -> Any:
    from vss.checkpoint import AtomicCheckpointIO

    return SimpleNamespace(
        state=SimpleNamespace(fn=fn),
        validating=validating,
        sanity_checking=sanity,
        global_step=step,
        strategy=SimpleNamespace(checkpoint_io=AtomicCheckpointIO()),
        _checkpoint_connector=_Checkpoints(),
    )


def test_save_on_validation_error_only_for_a_validation_inside_training(tmp_path: Path) -> None:
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    callback = SaveOnValidationError(tmp_path)
    error = DatasetError("broken")
    for trainer, exception in (
        (_trainer(validating=False), error),  # a training step's error
        (_trainer(fn="validate"), error),  # vss.eval / the final validation: nothing to keep
        (_trainer(sanity=True), error),
        (_trainer(step=0), error),
        (_trainer(), SIGTERMException()),  # SaveOnSigterm's
        (_trainer(), KeyboardInterrupt()),
    ):
        callback.on_exception(trainer, None, exception)
        assert not (tmp_path / "last.ckpt").exists()
    callback.on_exception(_trainer(), None, error)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False) == {"global_step": 7}


# -- the CLI -----------------------------------------------------------------------------------------------------
def _broken_data(tiny_data_dir: Path, tmp_path: Path, fault: str) -> tuple[Path, Path]:
    """A copy of the tiny synthetic data (``paths.data_dir``) with one broken validation mask; (data dir, mask)."""
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data_dir)
    (mask,) = data_dir.glob("synthetic-*/data/val_001/mask/00000680.png")
    return data_dir, truncate(mask) if fault == "truncated" else relabel(mask, 200)


def _report(proc: subprocess.CompletedProcess) -> str:
    return f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("fault", [pytest.param("truncated", marks=pytest.mark.slow), "label"])
def test_vss_train_stops_before_the_first_step(fault: str, run_cli, tiny_args, tiny_data_dir, tmp_path) -> None:
    data_dir, mask = _broken_data(tiny_data_dir, tmp_path, fault)
    proc = run_cli(*tiny_args(tmp_path / "logs"), f"paths.data_dir={data_dir}", "data.verify=false")
    assert proc.returncode == 2, _report(proc)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(("error: cannot read mask", "error: ")), _report(proc)
    assert str(mask) in errors[0] and errors[0].endswith("(data.check_val=auto, full)"), _report(proc)
    assert "Traceback" not in proc.stderr and "step:" not in proc.stdout + proc.stderr, _report(proc)
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


def test_a_validation_error_in_training_saves_last_ckpt_first(run_cli, tiny_args, tiny_data_dir, tmp_path) -> None:
    data_dir, mask = _broken_data(tiny_data_dir, tmp_path, "truncated")
    args = [*tiny_args(tmp_path / "logs"), f"paths.data_dir={data_dir}", "data.verify=false"]
    proc = run_cli(*args, "data.check_val=off")  # the first validation, at step 2, reads the broken mask
    assert proc.returncode == 2, _report(proc)
    assert proc.stderr.strip().splitlines()[-1].endswith(f"error: cannot read mask {mask} (image file is truncated)")
    (last,) = (tmp_path / "logs").rglob("last.ckpt")
    assert f"[vss] the validation at step 2 failed; the weights of step 2 are saved first: {last}" in proc.stdout
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
    shutil.copy(mask.with_name("00000681.png"), mask)  # fixed: the resume trains on to max_steps
    resumed = run_cli(f"ckpt_path={last}")
    assert resumed.returncode == 0, _report(resumed)
    assert json.loads((last.parent.parent / "metrics.json").read_text())["step"] == 4
