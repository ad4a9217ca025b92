"""The base of the metrics that read frames in temporal order (mVC, the flicker rate)."""

from __future__ import annotations

from typing import Any

from torchmetrics import Metric


class StreamingMetric(Metric):
    """A torchmetrics ``Metric`` fed whole videos in frame order: besides its synced sums it keeps a local stream
    state (the current video, the frames it needs from it), cleared by :meth:`_clear_stream` on ``reset``;
    ``forward`` only updates (a per-batch value means nothing for a video metric)."""

    def _clear_stream(self) -> None:
        """Forget the stream state (subclasses: the current video and what they keep of it)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Reset the synced sums and the stream state."""
        super().reset()
        self._clear_stream()

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Same as ``update`` (a streaming metric has no per-batch value)."""
        self.update(*args, **kwargs)
