"""MAR's memory: its file (``memory.pt``, the official ``key.npy``/``value.npy``), the per-class sampling of the
memory pass and the pass itself over a built model=stf and an iterable of batches."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vss.errors import ConfigError
from vss.models.aggregators.stf_mar.checks import positive_int


def save_memory(path: str | Path, key: Tensor, prototype: Tensor, count: Tensor) -> None:
    """Write a MAR memory: ``key`` (num_classes*K, C), class-major; ``prototype`` (num_classes, C); ``count``
    (num_classes,) the correct pixels seen per class (-1: unknown). Read back by :func:`load_memory`."""
    from vss.checkpoint import atomic_torch_save

    memory = {"key": key.detach().float().cpu(), "prototype": prototype.detach().float().cpu()}
    memory["count"] = torch.as_tensor(count).detach().long().cpu()
    _check_memory(memory, str(path))
    atomic_torch_save(memory, path)


def _check_memory(memory: Any, source: str) -> dict[str, Tensor]:
    if not isinstance(memory, dict) or not {"key", "prototype", "count"} <= set(memory):
        raise ConfigError(f"model.memory={source}: expected a dict with key, prototype and count (vss save_memory)")
    key, prototype, count = memory["key"], memory["prototype"], memory["count"]
    if not all(isinstance(t, Tensor) for t in (key, prototype, count)):
        raise ConfigError(f"model.memory={source}: key, prototype and count must be tensors")
    n = prototype.shape[0] if prototype.ndim == 2 else 0
    ok = (
        key.ndim == 2
        and prototype.ndim == 2
        and key.shape[1] == prototype.shape[1]
        and n > 0
        and key.shape[0] % n == 0
        and tuple(count.shape) == (n,)
    )
    if not ok:
        raise ConfigError(
            f"model.memory={source}: key {tuple(key.shape)}, prototype {tuple(prototype.shape)}, count "
            f"{tuple(count.shape)}: expected (num_classes*K, C), (num_classes, C), (num_classes,)"
        )
    return {"key": key.float(), "prototype": prototype.float(), "count": count.long()}


def load_memory(path: str | Path) -> dict[str, Tensor]:
    """Read a MAR memory written by :func:`save_memory` (shapes checked)."""
    if not Path(path).is_file():
        raise ConfigError(f"model.memory={str(path)!r} is invalid: the file does not exist (expected a memory.pt)")
    from vss.checkpoint import load_checkpoint

    return _check_memory(load_checkpoint(path, key="model.memory", expect="dict", flag=None, mmap=False), str(path))


def load_official_memory(key_npy: str | Path, value_npy: str | Path, keys_per_class: int = 10) -> dict[str, Tensor]:
    """The official memory files (ST_Memory ``generate_memory/output/key.npy`` (190,512), class-major, and
    ``value.npy`` (19,512) prototypes) as a :func:`load_memory` dict; ``count`` is unknown (-1)."""
    key = torch.from_numpy(np.load(key_npy).astype(np.float32))
    prototype = torch.from_numpy(np.load(value_npy).astype(np.float32))
    if key.ndim != 2 or prototype.ndim != 2 or key.shape != (prototype.shape[0] * keys_per_class, prototype.shape[1]):
        raise ConfigError(
            f"{key_npy} {tuple(key.shape)} and {value_npy} {tuple(prototype.shape)}: expected (num_classes*"
            f"{keys_per_class}, C) and (num_classes, C)"
        )
    count = torch.full((prototype.shape[0],), -1, dtype=torch.long)
    return _check_memory({"key": key, "prototype": prototype, "count": count}, str(key_npy))


# -- the memory pass ---------------------------------------------------------------------------------------
class MemorySampler:
    """Official ``Memory_Sampler`` (A.5): per class, of the correctly predicted pixels, the K lowest-score ones
    (the keys: hard samples) and the K highest-score ones (their mean: the prototype), score = max softmax.

    Made order-independent: equal scores are ordered by a global pixel id, so a pass over shards (DDP ranks)
    merged with :meth:`merge` equals one pass. The official sampler's visit-order quirks (its first K samples
    always go to the keys; a sample sits in the keys or the values, never both; the random flip of its data) are
    not reproduced: with at least 2K correct pixels per class the two sets are the same as its intent.
    """

    def __init__(self, num_classes: int, dim: int, keys_per_class: int = 10, values_per_class: int = 10) -> None:
        c, kl, kh = int(num_classes), positive_int("keys_per_class", keys_per_class), int(values_per_class)
        positive_int("values_per_class", kh)
        self.num_classes, self.dim, self.keys_per_class, self.values_per_class = c, int(dim), kl, kh
        self.count = torch.zeros(c, dtype=torch.long)
        big = torch.iinfo(torch.long).max
        self.low = (torch.full((c, kl), float("inf")), torch.full((c, kl), big), torch.zeros(c, kl, self.dim))
        self.high = (torch.full((c, kh), -float("inf")), torch.full((c, kh), big), torch.zeros(c, kh, self.dim))

    @staticmethod
    def _keep(
        kept: tuple[Tensor, Tensor, Tensor], new: tuple[Tensor, Tensor, Tensor], c: int, k: int, lowest: bool
    ) -> None:
        """Class ``c``'s K best of the kept and the new (score, uid, feature), ordered by (score, uid)."""
        score = torch.cat([kept[0][c], new[0]])
        uid = torch.cat([kept[1][c], new[1]])
        feat = torch.cat([kept[2][c], new[2]])
        order = torch.argsort(uid, stable=True)
        order = order[torch.argsort(score[order], descending=not lowest, stable=True)][:k]
        kept[0][c], kept[1][c], kept[2][c] = score[order], uid[order], feat[order]

    def update(self, features: Tensor, scores: Tensor, labels: Tensor, uids: Tensor) -> None:
        """Add correct pixels: features (N,C), scores (N,), class labels (N,), unique pixel ids (N,)."""
        features, scores = features.detach().float().cpu(), scores.detach().float().cpu()
        labels, uids = labels.detach().long().cpu(), uids.detach().long().cpu()
        for c in labels.unique().tolist():
            pick = labels == c
            self.count[c] += int(pick.sum())
            new = (scores[pick], uids[pick], features[pick])
            self._keep(self.low, new, c, self.keys_per_class, lowest=True)
            self._keep(self.high, new, c, self.values_per_class, lowest=False)

    def merge(self, other: MemorySampler) -> None:
        """Fold in another shard's sampler (same sizes): the result equals one pass over both shards."""
        if (other.num_classes, other.dim, other.keys_per_class, other.values_per_class) != (
            self.num_classes,
            self.dim,
            self.keys_per_class,
            self.values_per_class,
        ):
            raise ValueError("MemorySampler.merge: the samplers differ in classes, channels or K")
        self.count += other.count
        for c in range(self.num_classes):
            self._keep(self.low, tuple(t[c] for t in other.low), c, self.keys_per_class, lowest=True)
            self._keep(self.high, tuple(t[c] for t in other.high), c, self.values_per_class, lowest=False)

    def memory(self, names: Sequence[str] | None = None) -> tuple[dict[str, Tensor], list[str]]:
        """The memory dict (:func:`save_memory` layout: class-major keys, prototypes, counts) and notes on the
        classes (``names``) with fewer than K correct pixels (keys tiled) or none (zero slots)."""
        kl, kh = self.keys_per_class, self.values_per_class
        names = [str(n) for n in names] if names is not None else [str(c) for c in range(self.num_classes)]
        key = torch.zeros(self.num_classes * kl, self.dim)
        prototype = torch.zeros(self.num_classes, self.dim)
        notes = []
        for c in range(self.num_classes):
            n = int(self.count[c])
            if n == 0:
                notes.append(f"class {names[c]}: no correctly predicted pixel; its {kl} key slots and prototype are 0")
                continue
            if n < kl:
                notes.append(f"class {names[c]}: {n} correct pixel(s) < {kl} keys; its keys are tiled")
            key[c * kl : (c + 1) * kl] = self.low[2][c, torch.arange(kl) % min(n, kl)]
            prototype[c] = self.high[2][c, : min(n, kh)].mean(0)
        return {"key": key, "prototype": prototype, "count": self.count.clone()}, notes

    def state(self) -> dict[str, Any]:
        """Plain tensors (what a DDP all_gather carries)."""
        return {"count": self.count, "low": self.low, "high": self.high}

    def load_state(self, state: dict[str, Any]) -> MemorySampler:
        """Set from :meth:`state`; returns self."""
        self.count, self.low, self.high = state["count"], tuple(state["low"]), tuple(state["high"])
        return self


@torch.no_grad()
def collect_memory(
    segmenter: nn.Module,
    batches: Iterable[dict[str, Any]],
    sampler: MemorySampler,
    device: str | torch.device = "cpu",
) -> MemorySampler:
    """The memory pass of a trained model=stf over labelled clips, into ``sampler``: per batch (one clip of the clip
    path, ``EvalClips``: ``images`` (1, T, 3, H, W), ``num_references``, ``labels`` and ``index``, the clip's index
    in its data set, which numbers its pixels), the STF output (``features``) and the max softmax of the 1/8 logits
    at the pixels where the argmax equals the label downsampled to 1/8 (nearest)."""
    segmenter.eval()
    for batch in batches:
        clip = batch["images"].to(device)
        n = int(batch["num_references"][0])
        out = segmenter(clip[:, clip.shape[1] - 1 - n :])
        if "features" not in out:
            raise ConfigError("the memory pass needs a model whose aggregate returns features (model=stf / stf_mar)")
        logits, feats = out["logits"].float(), out["features"].float()
        h, w = logits.shape[-2:]
        labels = F.interpolate(batch["labels"][:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        labels = labels.to(logits.device)
        score, pred = torch.softmax(logits, 1).max(1)
        correct = (pred == labels).flatten()
        uids = int(batch["index"][0]) * h * w + torch.arange(h * w, device=logits.device)
        sampler.update(
            feats.flatten(2)[0].t()[correct], score.flatten()[correct], labels.flatten()[correct], uids[correct]
        )
    return sampler
