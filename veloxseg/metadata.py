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
    metrics: dict[str, float] = field(default_factory=dict)  # name -> value on the held-out data
    datasets: list[str] = field(default_factory=list)  # Hub dataset ids or dataset names (model card)
    training_command: str = ""  # the command that trained the weights (model card)

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

    def problems(self, in_ch: tuple[int, ...], n_classes: int) -> list[str]:
        """Why this metadata cannot describe a model with groups ``in_ch`` and ``n_classes`` (empty: it can)."""
        found = []
        groups = [c.group for c in self.channels]  # input order: group 0's channels first
        if groups != [g for g, count in enumerate(in_ch) for _ in range(count)]:
            found.append(f"its channels have groups {groups} but the model's in_ch is {list(in_ch)}")
        if sorted(self.labels.values()) != list(range(n_classes)):
            found.append(f"its labels {self.labels} are not the values 0..{n_classes - 1} of {n_classes} classes")
        return found

    @classmethod
    def fitting(cls, values: dict[str, Any] | None, in_ch: tuple[int, ...], n_classes: int) -> "ModelMetadata":
        """``values`` (a pretrained config's metadata) when they describe a model with these groups and
        classes, else :meth:`default` (the data of a model whose inputs or classes changed is unknown)."""
        metadata = cls.from_dict(values) if values else None
        if metadata is None or metadata.problems(in_ch, n_classes):
            return cls.default(in_ch, n_classes)
        return metadata
