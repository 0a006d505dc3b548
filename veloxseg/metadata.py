"""The 3-D metadata a segmentation checkpoint needs and timm's 2-D pretrained config cannot hold.

Stored as ``pretrained_cfg["veloxseg"]`` on a model and in config.json; read by the trainer (to
write it), by ``predict`` (to preprocess scans the way training did) and by the model card.
"""

from dataclasses import asdict, dataclass, field
from typing import Any

from .config import json_ready


@dataclass
class ChannelInfo:
    """One input channel. ``normalisation``: "ct" (clip to ``clip`` then z-score with the dataset's
    ``mean``/``std``), "zscore" (per-scan z-score over the nonzero foreground) or "none"."""

    name: str
    group: int  # modality group index (position in in_ch)
    normalisation: str = "zscore"
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None


@dataclass
class ModelMetadata:
    """Everything about the data a model was trained on that inference must reproduce."""

    channels: list[ChannelInfo]
    labels: dict[str, int]  # name -> value, background included
    spacing: tuple[float, float, float] | None = None  # mm, in the model's orientation; None: native
    orientation: str = "RAS"
    training_data: str = ""
    license: str = "apache-2.0"
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json_ready(asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelMetadata":
        values = dict(values)
        channels = [ChannelInfo(**c) for c in values.pop("channels")]
        for c in channels:
            c.clip = tuple(c.clip) if c.clip is not None else None
        spacing = values.pop("spacing", None)
        return cls(channels=channels, spacing=tuple(spacing) if spacing else None, **values)

    @classmethod
    def default(cls, in_ch: tuple[int, ...], n_classes: int) -> "ModelMetadata":
        """Generic metadata for an untrained model: z-scored channels, labels named by value."""
        channels = [
            ChannelInfo(name=f"group{g}_channel{c}", group=g) for g, count in enumerate(in_ch) for c in range(count)
        ]
        labels = {"background": 0, **{f"class_{i}": i for i in range(1, n_classes)}}
        return cls(channels=channels, labels=labels)
