"""STF + MAR (Zhuang et al., TCSVT; arXiv 2301.03832), as the official code (jfzhuang/ST_Memory) computes it.

Base network: mmseg PSPNet R50-D8 (``encoder=resnet50c``, :class:`vss.models.heads.PSPHead`). Per frame
(:meth:`STFMAR.encode`, cacheable): the PSP bottleneck feature (512 x H/8 x W/8). Temporal
(:meth:`STFMAR.aggregate`): the frames t-1, t, t+1 (``offsets``, stacked in time order) go through the
Spatial-Temporal Fusion transformer (:class:`SpatialTemporalFusion`: one post-norm encoder layer over the
frames, one decoder layer with the raw target feature as query; every attention is a 3-D interlaced sparse
attention, :class:`InterlacedSparseAttention`); with ``mar=true`` the Memory-Augmented Refinement
(:class:`MemoryAugmentedRefinement`) lets each pixel attend over a static class memory; the PSP classifier
``decode_head.conv_seg`` (official ``cls_seg``) gives the logits at 1/8.

Stages are config, not code, as the official code's training scripts run them (experiments/stf_mar.md, 'The
stages, as the official code runs them'):

1. ``model=stf`` (``mar=false``): init_from a PSPNet run/checkpoint, ``freeze=[encoder,
   aggregator.decode_head.psp_modules, aggregator.decode_head.bottleneck]``, ``init_exclude=
   [aggregator.decode_head.conv_seg]`` (the official code re-initialises the classifier at each stage).
2. The memory pass: a stage-1 model's ``aggregate`` returns ``features`` (the STF output) beside ``logits``
   at inference too; the pass keeps, per class, the K lowest-score correct pixels as keys and the mean of
   the K highest-score ones as the prototype, and writes them with :func:`save_memory`
   (:func:`collect_memory` on a built model; ``vss.passes.build_memory`` reads the checkpoint and the data).
3. ``model=stf_mar`` (``mar=true``) ``model.memory=memory.pt``: init_from stage 1, freeze also
   ``aggregator.stf``; MAR, its memory and ``conv_seg`` train.

Readings where the notes are silent: the positional tables are resized with ``align_corners=False`` (the
``F.interpolate`` default; at the official 1024x2048 input the resize is the identity and is skipped);
the short-range step of the decoder's cross-attention adds the target's ``query_pos``; a target predicted
alone (``aggregate(target, [])``) runs STF with T=1 and the target's own slice of ``pe_enc``; MAR has no
dropout on its attention weights.

Files: ``checks`` (config values and checks), ``stf`` (STF and its interlaced sparse attention), ``mar`` (MAR),
``memory`` (the memory file, its sampling and the memory pass of a built model), ``aggregator`` (:class:`STFMAR`),
``official`` (the official checkpoints' importer). ``python -m vss.models.aggregators.stf_mar`` runs
``vss.passes.main`` (the memory files from the command line).
"""

from vss.models.aggregators.stf_mar.aggregator import STFMAR, single_frame_baseline
from vss.models.aggregators.stf_mar.checks import (
    OFFICIAL_BLOCK,
    OUTPUT_STRIDE,
    auto_block,
    block_size_value,
    check_input_size,
    check_train_config,
)
from vss.models.aggregators.stf_mar.mar import MemoryAugmentedRefinement
from vss.models.aggregators.stf_mar.memory import (
    MemorySampler,
    collect_memory,
    load_memory,
    load_official_memory,
    save_memory,
)
from vss.models.aggregators.stf_mar.official import (
    convert_official_state_dict,
    import_official_checkpoint,
    official_names,
)
from vss.models.aggregators.stf_mar.stf import InterlacedSparseAttention, SpatialTemporalFusion

__all__ = [
    "OFFICIAL_BLOCK",
    "OUTPUT_STRIDE",
    "STFMAR",
    "InterlacedSparseAttention",
    "MemoryAugmentedRefinement",
    "MemorySampler",
    "SpatialTemporalFusion",
    "auto_block",
    "block_size_value",
    "check_input_size",
    "check_train_config",
    "collect_memory",
    "convert_official_state_dict",
    "import_official_checkpoint",
    "load_memory",
    "load_official_memory",
    "official_names",
    "save_memory",
    "single_frame_baseline",
]
