"""vss.convert's shared class rules: the checkpoint's class table from mmseg ``meta`` and the data group choice."""

from __future__ import annotations

import pytest
from hydra.core.global_hydra import GlobalHydra

from vss.convert import GENERIC_DATA, choose_data, class_table
from vss.errors import ConfigError

NAMES = ["sky", "road", "car"]
PALETTE = [[70, 130, 180], [128, 64, 128], [0, 0, 142]]


@pytest.fixture(autouse=True)
def _clear_hydra() -> None:
    GlobalHydra.instance().clear()


def test_class_table_reads_mmseg_0x_and_1x_meta() -> None:
    old = class_table({"CLASSES": tuple(NAMES), "PALETTE": PALETTE, "iter": 80000}, 3)  # mmcv runner (mmseg 0.x)
    assert (old.names, old.palette, old.source) == (NAMES, PALETTE, "meta['CLASSES']")
    new = class_table({"dataset_meta": {"classes": tuple(NAMES), "palette": PALETTE}}, 3)  # mmengine (mmseg 1.x)
    assert (new.names, new.palette, new.source) == (NAMES, PALETTE, "meta['dataset_meta']['classes']")
    assert class_table({"CLASSES": NAMES}, 3).palette is None
    assert "its palette" in old.describe() and "no palette" in class_table({"CLASSES": NAMES}, 3).describe()


@pytest.mark.parametrize(
    ("meta", "note"),
    [
        ({}, ""),
        ({"CLASSES": None, "PALETTE": None}, ""),  # mmseg 0.x with a data set that has no CLASSES
        ({"CLASSES": ["a", "b"]}, "; meta['CLASSES'] has 2 names, the weights 3 classes: not used"),
        ({"CLASSES": [1, 2, 3]}, ""),
    ],
)
def test_class_table_is_numbered_without_usable_names(meta: dict, note: str) -> None:
    table = class_table(meta, 3)
    assert table.names == ["class_0", "class_1", "class_2"]
    assert (table.palette, table.source, table.note) == (None, None, note)
    assert table.describe() == f"numbered names class_0...class_2 (no class names in the meta{note})"


@pytest.mark.parametrize("palette", [[[0, 0, 0]] * 2, [[0, 0, 256]] * 3, [[0, 0]] * 3, [[0.5, 0, 0]] * 3, "red"])
def test_class_table_drops_a_malformed_palette(palette: object) -> None:
    table = class_table({"CLASSES": NAMES, "PALETTE": palette}, 3)
    assert table.names == NAMES and table.palette is None
    assert table.note == "; its palette is not 3 RGB triples in 0..255: not used"


def test_choose_data_by_class_count() -> None:
    numbered = class_table({}, 19)
    # the composed (default) data set is synthetic (5 classes): the one group with 19 classes is picked
    assert choose_data(["model=pspnet"], [], 19, numbered).__dict__ == {
        "overrides": ["data=cityscapes_video"],
        "group": "cityscapes_video",
        "table_applies": True,
    }
    assert choose_data(["model=pspnet"], ["data=cityscapes_video"], 19, numbered).overrides == []
    # 5 classes: the synthetic set's table applies unless the checkpoint names its classes otherwise
    assert choose_data(["model=pspnet"], [], 5, class_table({}, 5)).table_applies
    other = class_table({"CLASSES": ["a", "b", "c", "d", "e"]}, 5)
    assert choose_data(["model=pspnet"], [], 5, other).__dict__ == {
        "overrides": [f"data={GENERIC_DATA}"],
        "group": GENERIC_DATA,
        "table_applies": False,
    }
    # a count no data set has: the VSPW-layout reader, already composed by the MRCFA preset
    assert choose_data(["experiment=mrcfa_vspw"], [], 7, class_table({}, 7)).overrides == []
    # the user's data set of another count: its layout only when data.num_classes is given too
    assert not choose_data(["model=pspnet"], ["data=synthetic", "data.num_classes=150"], 150, other).table_applies
    with pytest.raises(ConfigError, match=r"^data=synthetic has 5 classes but the checkpoint has 150: .*"):
        choose_data(["model=pspnet"], ["data=synthetic"], 150, other)
