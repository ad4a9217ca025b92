"""vss: an experiment suite for video semantic segmentation."""

import os

# albumentations checks PyPI for a newer version on import unless told not to; never touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
