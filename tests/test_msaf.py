"""MSAF: Table 3 rows as config values, deformable alignment, semantic assignment, losses, the rows' clips.

The contract every model meets (stream = clip, per-frame ``encode``, gradients, frozen parts, presets that
construct) is in test_contract.py; this file keeps what is MSAF's own."""

from __future__ import annotations

import csv
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from contract import assert_stream_equals_clip
from random_weights import randomize_
from vss.config import CONF_DIR
from vss.errors import ConfigError
from vss.models.aggregators.msaf import (
    MSAF,
    DeformableAlignment,
    VanillaSpatioTemporalTransformer,
    assignment_logits,
    region_descriptors,
)
from vss.models.encoders import build_encoder
from vss.models.segmenter import Segmenter
from vss.validation import validate_train_config

SMALL = {"embed_dim": 32, "num_heads": 2, "mlp_ratio": 2.0}
NUM_CLASSES = 5
BATTERY = {"msaf": {"encoder": "resnet18"}}  # the model battery (tests/battery.py): the paper's encoder family

# Parameter groups each Table 3 row must own (names of aggregator submodules), and the loss terms it logs.
ALWAYS = {"proj.F5", "soft_mask"}
PIXEL = {"proj.F3", "proj.F4", "pixel_descriptor", "pixel_classifier"}
DECOUPLED = {"motion.pst", "motion.att", "motion.att.dcn"}
ROWS: dict[str, tuple[set[str], set[str]]] = {
    "baseline": (ALWAYS, {"L_rd"}),
    "baseline_tr": (ALWAYS | {"motion.vanilla"}, {"L_rd"}),
    "motion_only": (ALWAYS | DECOUPLED, {"L_rd"}),
    "state_only": (ALWAYS | PIXEL | {"state"}, {"L_rd", "L_pd"}),
    "wo_motion": (ALWAYS | PIXEL | {"state", "scale"}, {"L_rd", "L_pd", "L_M"}),
    "wo_state": (ALWAYS | PIXEL | DECOUPLED | {"scale"}, {"L_rd", "L_pd", "L_M"}),
    "wo_semantics": (ALWAYS | PIXEL | DECOUPLED | {"state"}, {"L_rd", "L_pd"}),
    "wo_dcn": (ALWAYS | PIXEL | (DECOUPLED - {"motion.att.dcn"}) | {"state", "scale"}, {"L_rd", "L_pd", "L_M"}),
    "msaf": (ALWAYS | PIXEL | DECOUPLED | {"state", "scale"}, {"L_rd", "L_pd", "L_M"}),
}


def group(name: str) -> str:
    """The Table 3 component an aggregator parameter belongs to."""
    parts = name.split(".")
    if parts[0] == "proj":
        return f"proj.{parts[1]}"
    if parts[0] == "motion_alignment":
        if parts[1] == "att" and parts[2] == "dcn":
            return "motion.att.dcn"
        return f"motion.{parts[1]}" if parts[1] in ("pst", "att") else "motion.vanilla"
    return {"state_alignment": "state"}.get(parts[0], parts[0])


def row_values(row: str) -> dict:
    """The config values of ``conf/experiment/msaf_table3/<row>.yaml``."""
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / "msaf_table3" / f"{row}.yaml"))


def build(seed: int = 0, **kwargs) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter(build_encoder("resnet18"), partial(MSAF, **{**SMALL, **kwargs}), NUM_CLASSES)


@pytest.fixture(scope="module")
def msaf() -> Segmenter:
    return build().eval()


def clip_and_labels(b: int = 2, t: int = 3, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, t, 3, size, size, generator=g), torch.randint(0, NUM_CLASSES, (b, t, size, size), generator=g)


@pytest.mark.parametrize("row", list(ROWS))
def test_table3_row_builds_trains_a_step_and_owns_its_parameters(compose_cfg, row: str) -> None:
    cfg = compose_cfg(
        "experiment=msaf_synthetic", f"+experiment/msaf_table3={row}", *(f"model.{k}={v}" for k, v in SMALL.items())
    )
    assert {k: cfg.model[k] for k in row_values(row)} == row_values(row)
    torch.manual_seed(0)
    seg = Segmenter(instantiate(cfg.encoder), instantiate(cfg.model), NUM_CLASSES)
    expected_groups, expected_terms = ROWS[row]
    assert {group(n) for n, _ in seg.aggregator.named_parameters()} == expected_groups
    # the synthetic preset's clip t-6, t-3, t; rows without motion alignment read no reference frame
    assert seg.offsets == ((-6, -3) if cfg.model.motion else ()) and list(cfg.data.clip.offsets) == list(seg.offsets)
    if row == "baseline_tr":
        assert isinstance(seg.aggregator.motion_alignment, VanillaSpatioTemporalTransformer)
    with torch.no_grad():  # F3, F4 only where the pixel branch needs them
        assert set(seg.eval().encode(torch.randn(1, 3, 32, 32))) == (
            {"F5"} | ({"F3", "F4"} if expected_groups >= PIXEL else set())
        )
    seg.train()

    clip, labels = clip_and_labels(t=1 + len(seg.offsets))
    seg.encoder.requires_grad_(False)  # speed: the encoder's training is checked in the gradient-flow tests
    before = {n: p.detach().clone() for n, p in seg.aggregator.named_parameters()}
    opt = torch.optim.AdamW(seg.aggregator.parameters(), lr=1e-3)
    terms = seg.losses(seg(clip), labels)
    assert set(terms) == expected_terms
    loss = torch.stack(list(terms.values())).sum()
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    changed = {group(n) for n, p in seg.aggregator.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected_groups  # every component of the row is trained


def test_rows_differ_from_msaf_by_their_components() -> None:
    full = {n for n, _ in build().aggregator.named_parameters()}
    no_dcn = {n for n, _ in build(dcn=False).aggregator.named_parameters()}
    conv = {n for n, _ in build(dcn="conv").aggregator.named_parameters()}
    no_state = {n for n, _ in build(state=False).aggregator.named_parameters()}
    no_sem = {n for n, _ in build(semantics=False).aggregator.named_parameters()}
    assert full - no_dcn == {n for n in full if ".att.dcn." in n} and not no_dcn - full
    assert {n for n in conv if ".att.dcn." in n} == {
        f"motion_alignment.att.dcn.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")
    }
    assert full - no_state == {n for n in full if n.startswith("state_alignment.")} and not no_state - full
    assert full - no_sem == {"scale"} and not no_sem - full


def test_deformable_alignment_with_zero_offsets_and_identity_weights_reproduces_its_input() -> None:
    dim = 4
    align = DeformableAlignment(dim)
    with torch.no_grad():
        align.weight.zero_()
        align.weight[:, :, 1, 1] = torch.eye(dim)  # identity at the centre tap
        align.offset.bias[18:] = 30.0  # modulation mask sigmoid(30) = 1; offsets stay 0 (zero-initialised)
    x, target = torch.randn(2, dim, 7, 9), torch.randn(2, dim, 7, 9)
    torch.testing.assert_close(align(x, target), x, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # offsets (dy, dx) = (0, +1) on every tap: sample one pixel to the right
        align.offset.bias[1:18:2] = 1.0
    shifted = torch.cat([x[..., 1:], torch.zeros_like(x[..., :1])], -1)
    torch.testing.assert_close(align(x, target), shifted, atol=1e-5, rtol=1e-5)


def test_assignment_logits_are_the_scaled_cosine_of_a_hand_made_case() -> None:
    p = torch.tensor([[3.0, 0.0], [1.0, 3.0], [0.0, -2.0]]).T.reshape(1, 2, 1, 3)  # 3 pixel descriptors
    r = torch.tensor([[[2.0, 0.0], [0.0, 5.0]]])  # 2 region descriptors (normalised inside)
    s = 10.0
    expected = s * torch.tensor([[1.0, 1 / math.sqrt(10), 0.0], [0.0, 3 / math.sqrt(10), -1.0]]).reshape(1, 2, 1, 3)
    torch.testing.assert_close(assignment_logits(p, r, s), expected)
    assert assignment_logits(p, r, s).argmax(1).tolist() == [[[0, 1, 0]]]  # minimum cosine distance (eq. 13)


def test_region_descriptors_pool_motion_features_by_class() -> None:
    m = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, -4.0]]).T.reshape(1, 2, 1, 3)
    soft_mask = torch.tensor([[50.0, 50.0, -50.0], [-50.0, -50.0, 50.0]]).reshape(1, 2, 1, 3)
    r = region_descriptors(m, soft_mask)
    torch.testing.assert_close(r, torch.tensor([[[1.0, 0.0], [0.0, -1.0]]]))


def test_msaf_logits_are_bounded_by_the_learned_scale(msaf: Segmenter) -> None:
    clip, _ = clip_and_labels()
    with torch.no_grad():
        logits = msaf(clip)["logits"]
    assert logits.shape == (2, NUM_CLASSES, 4, 4)  # output stride 8
    assert logits.abs().max() <= msaf.aggregator.scale.abs() + 1e-4


BRANCHES = ("soft_mask", "pixel_classifier", "pixel_descriptor", "state_alignment", "motion_alignment", "scale")
FLOWS = {  # the branches each loss term must (True) or must not (False) reach
    "L_rd": dict.fromkeys(BRANCHES, False) | {"soft_mask": True, "motion_alignment": True},
    "L_pd": dict.fromkeys(BRANCHES, True) | {"soft_mask": False, "scale": False},
    "L_M": dict.fromkeys(BRANCHES, True) | {"pixel_classifier": False},
}


@pytest.mark.parametrize("term", list(FLOWS))
def test_each_loss_flows_gradients_to_its_branches(term: str) -> None:
    seg = build()
    clip, labels = clip_and_labels()
    seg.losses(seg(clip), labels)[term].backward()
    for branch, reached in FLOWS[term].items():
        grads = [p.grad for n, p in seg.aggregator.named_parameters() if n.split(".")[0] == branch]
        got = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert got == reached, f"{term} {'does not reach' if reached else 'reaches'} {branch}"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in seg.encoder.parameters())


@pytest.mark.parametrize("row", ["baseline_tr", "wo_dcn", "wo_motion"])
def test_streaming_equals_the_clip_path_for_other_rows(row: str) -> None:
    """The contract battery streams the default row; the other temporal modules (vanilla transformer, no DCN) and
    a row without references stream too (random weights, so the deformable offsets are not zero)."""
    seg = randomize_(build(**row_values(row))).eval()
    video = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert_stream_equals_clip(seg, video, (1, 4), row)


def test_references_change_the_prediction_only_with_motion_alignment(msaf: Segmenter) -> None:
    clip, _ = clip_and_labels()
    other = clip.clone()
    other[:, :2] = torch.randn_like(other[:, :2])
    with torch.no_grad():
        assert not torch.allclose(msaf(clip)["logits"], msaf(other)["logits"])
    baseline = build(**row_values("baseline")).eval()
    assert baseline.offsets == () and baseline.references(5, 10) == []  # the single-frame baseline reads no frame
    assert msaf.offsets == (-2, -1) and msaf.references(1, 10) == [0, 0]  # the default clip, clamped at the start


def test_motion_alignment_needs_its_references(msaf: Segmenter) -> None:
    with torch.no_grad():
        with pytest.raises(ConfigError, match=r"model\.offsets"):
            msaf(torch.randn(1, 4, 3, 32, 32))  # three references for two
        with pytest.raises(ConfigError, match="from its own frame alone"):
            msaf.aggregate(msaf.encode(torch.randn(1, 3, 32, 32)), [])


def test_bad_config_values_are_named() -> None:
    channels = [64, 128, 256, 512]
    for key, value in (("dcn", "yes"), ("motion_transformer", "swin"), ("mask_average", "max"), ("offsets", [-1])):
        with pytest.raises(ConfigError, match=f"model.{key}"):
            MSAF(channels, NUM_CLASSES, **{key: value})
    with pytest.raises(ConfigError, match=r"model\.offsets=\[-2, -1\].*expected \[\]"):
        MSAF(channels, NUM_CLASSES, motion=False)  # without motion alignment no reference frame is read
    with pytest.raises(ConfigError, match="model.offsets"):
        MSAF(channels, NUM_CLASSES, pst_downsample=(4, 2, 2, 1))  # one offset per entry but the last
    assert MSAF(channels, NUM_CLASSES, offsets=(-2, 1)).lookahead == 1  # references after the target are fine


def test_model_config_sets_the_clip_and_cityscapes_preset_fails_early(compose_cfg) -> None:
    cfg = compose_cfg("model=msaf", "encoder=resnet18")
    assert list(cfg.model.offsets) == list(cfg.data.clip.offsets) == [-2, -1]
    validate_train_config(cfg)
    # synthetic: colour hidden up to 6 frames, so the references reach back to a visible frame
    assert list(compose_cfg("experiment=msaf_synthetic").data.clip.offsets) == [-6, -3]
    assert list(compose_cfg("experiment=msaf_synthetic", "+experiment/msaf_table3=wo_motion").data.clip.offsets) == []
    cfg = compose_cfg("experiment=msaf_cityscapes")
    assert list(cfg.data.clip.offsets) == [-2, -1]
    assert (cfg.encoder.name, cfg.trainer.max_steps, cfg.data.batch_size, list(cfg.data.crop_size)) == (
        "resnet50",
        80000,
        2,
        [769, 769],
    )
    assert (cfg.optim.optimizer.lr, cfg.optim.scheduler.warmup_steps, cfg.data.num_classes) == (6e-5, 1500, 19)
    with pytest.raises(ConfigError, match=r"data\.root is required"):
        validate_train_config(cfg)


@pytest.mark.slow
def test_cli_trains_msaf_and_logs_each_loss(run_cli, tiny_overrides) -> None:
    proc = run_cli("experiment=msaf_synthetic", *tiny_overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = Path(proc.stdout.split("[vss] run directory: ")[-1].strip())
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        header = next(csv.reader(f))
    assert {"train/L_pd", "train/L_rd", "train/L_M", "val/mIoU", "val/mVC8"} <= set(header)
