"""How saved predictions are named and encoded on disk (``vss.eval save_predictions`` and ``pred_root``).

A data module lists the formats it offers (:meth:`~vss.data.datamodule.VSSDataModule.prediction_formats`);
``prediction_format=auto`` picks its first. A format maps a labelled frame (its video and label file name) to
a file under the prediction root, and train ids to the stored values and back, so that writing and scoring
agree by construction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class PredictionFormat:
    """Train ids 0..C-1 as 8-bit PNGs at ``<video>/<label file name>`` (the VSPW submission layout)."""

    name = "train_ids"
    layout = "<video>/<label file name>, class ids 0..C-1"

    def relative_path(self, video: str, label_name: str) -> Path:
        """The file, under the prediction root, of the frame of ``video`` whose label file is ``label_name``."""
        return Path(video) / label_name

    def encode(self, train_ids: np.ndarray) -> np.ndarray:
        """The values to store for a map of train ids (H,W) uint8."""
        return train_ids

    def decode(self, stored: np.ndarray, path: Path) -> np.ndarray:
        """The train ids of stored values (``path`` names the file in an error)."""
        return stored
