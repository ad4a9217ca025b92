"""Passes between training stages (a pipeline's ``run: {_target_: ...}`` stages): read a checkpoint and the data,
run a model-level pass, write its product. Today: STF+MAR's memory pass (``python -m vss.passes`` too)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from vss.errors import ConfigError
from vss.models.aggregators.stf_mar import (
    STFMAR,
    MemorySampler,
    collect_memory,
    load_official_memory,
    save_memory,
)

__all__ = ["build_memory", "main", "memory_batches"]


class _Indexed(torch.utils.data.Dataset):
    """A dataset whose items also carry their index (the global pixel ids of the memory pass)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "index": i}


def memory_batches(
    dataset: Any, indices: Sequence[int] | None = None, num_workers: int = 0, progress: bool = False
) -> Iterable[dict[str, Any]]:
    """The clips of ``dataset`` (``indices``: a shard; all by default) one at a time with their index, as
    :func:`vss.models.aggregators.stf_mar.collect_memory` reads them."""
    from tqdm import tqdm

    order = list(range(len(dataset))) if indices is None else list(indices)
    loader = torch.utils.data.DataLoader(_Indexed(dataset), batch_size=1, sampler=order, num_workers=num_workers)
    return tqdm(loader, desc="memory pass", disable=not progress)


def build_memory(
    checkpoint: str,
    output_dir: str,
    split: str | None = None,
    keys_per_class: int | None = None,
    values_per_class: int = 10,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    data: dict[str, Any] | None = None,
) -> str:
    """The memory pass on a vss checkpoint of a trained model=stf: ``output_dir/memory.pt`` (for
    ``model.memory=``) and ``memory.json`` (per-class counts and notes); returns the memory.pt path.

    ``split``: the data's training split by default (as the official pass over Cityscapes train), with the
    evaluation transform (no augmentation); ``data``: overrides of the checkpoint's data config (e.g. the
    official full-resolution ``scale``, another ``root``). Under an initialised torch.distributed group every
    rank takes its whole videos and the candidates are merged, so the result equals one process; rank 0 writes.
    """
    import torch.distributed as dist
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from vss.data.datasets import VideoShardSampler
    from vss.lit import load_module, read_module_checkpoint

    ckpt, cfg = read_module_checkpoint(checkpoint)
    own = {"num_workers": num_workers, "persistent_workers": False}
    datamodule = instantiate(OmegaConf.merge(cfg.data, dict(data or {}), own))
    loaded = load_module(checkpoint, device=device, class_names=datamodule.class_names, checkpoint=(ckpt, cfg))
    seg = loaded.module.segmenter
    aggregator = seg.aggregator
    if not isinstance(aggregator, STFMAR):
        raise ConfigError(
            f"{checkpoint}: the memory pass reads a model=stf checkpoint, not {type(aggregator).__name__}"
        )
    k = int(keys_per_class or aggregator.keys_per_class)
    datamodule.setup("fit")
    split = split or datamodule.splits["fit"]
    datamodule.use_clip_path(seg.references, 1 + len(seg.offsets))
    dataset = datamodule.eval_dataset(split)
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    indices = VideoShardSampler(dataset, world, rank).indices if world > 1 else None
    sampler = MemorySampler(datamodule.num_classes, aggregator.stf.pe_enc.shape[1], k, values_per_class)
    collect_memory(seg, memory_batches(dataset, indices, num_workers, progress and rank == 0), sampler, device)
    if world > 1:
        states: list[Any] = [None] * world
        dist.all_gather_object(states, sampler.state())
        sampler = MemorySampler(datamodule.num_classes, sampler.dim, k, values_per_class)
        for state in states:
            sampler.merge(MemorySampler(sampler.num_classes, sampler.dim, k, values_per_class).load_state(state))
    names = [str(n) for n in (datamodule.class_names or range(datamodule.num_classes))]
    memory, notes = sampler.memory(names)
    out = Path(output_dir) / "memory.pt"
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_memory(out, memory["key"], memory["prototype"], memory["count"])
        report = {
            "checkpoint": str(checkpoint),
            "split": split,
            "clips": len(dataset),
            "keys_per_class": k,
            "values_per_class": values_per_class,
            "correct_pixels": {str(n): int(c) for n, c in zip(names, memory["count"].tolist(), strict=True)},
            "notes": notes,
        }
        tmp = out.with_name("memory.json.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(out.with_name("memory.json"))
        counts = ", ".join(f"{n} {c}" for n, c in report["correct_pixels"].items())
        print(f"[vss] memory pass over {len(dataset)} {split} clips: correct pixels per class: {counts}")
        for note in notes:
            print(f"[vss] memory: {note}")
        print(
            f"[vss] memory written to {out} (key {tuple(memory['key'].shape)}, prototype "
            f"{tuple(memory['prototype'].shape)})"
        )
    return str(out)


def main(argv: Sequence[str] | None = None, prog: str = "python -m vss.passes") -> int:
    """The memory files: ``--ckpt STF.ckpt --out DIR`` runs the memory pass on a trained model=stf (DIR/memory.pt);
    ``--key key.npy --value value.npy --out memory.pt`` converts the official files."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    parser.add_argument("--ckpt", help="memory pass: a vss checkpoint of a trained model=stf")
    parser.add_argument("--split", help="memory pass: the split to read (default: the data's training split)")
    parser.add_argument("--device", default="cpu", help="memory pass: cpu or cuda")
    parser.add_argument("--num-workers", type=int, default=0, help="memory pass: DataLoader workers")
    parser.add_argument("--key", help="official key.npy (num_classes*K, C)")
    parser.add_argument("--value", help="official value.npy (num_classes, C)")
    parser.add_argument("--keys-per-class", type=int, default=None, help="K (official: 10)")
    parser.add_argument("--out", required=True, help="memory pass: the output folder; conversion: memory.pt")
    args = parser.parse_args(argv)
    if bool(args.ckpt) == bool(args.key or args.value) or (not args.ckpt and not (args.key and args.value)):
        parser.error("give --ckpt (the memory pass) or both --key and --value (the official files)")
    try:
        if args.ckpt:
            build_memory(args.ckpt, args.out, args.split, args.keys_per_class, 10, args.device, args.num_workers)
            return 0
        memory = load_official_memory(args.key, args.value, args.keys_per_class or 10)
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_memory(args.out, memory["key"], memory["prototype"], memory["count"])
    print(f"[vss] {args.out}: key {tuple(memory['key'].shape)}, prototype {tuple(memory['prototype'].shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
