"""The 3-D metadata a segmentation checkpoint needs and timm's 2-D pretrained config cannot hold.

Stored as ``pretrained_cfg["veloxseg"]`` on a model and in config.json; read by the trainer (to
write it), by ``predict`` (to preprocess scans the way training did) and by the model card.
"""

from dataclasses import asdict, dataclass, field
from typing import Any

from .config import MODALITY_DROPOUT_MODES, json_ready

NORMALISATIONS = ("ct", "zscore", "foreground_zscore", "none")
AXIS_CODES = ("LR", "PA", "IS")  # one letter of each pair, in any order: "RAS", "LPS", ...


def check_spacing(spacing: Any, name: str = "spacing") -> tuple[float, float, float]:
    """``spacing`` as three floats (mm), or ValueError naming ``name`` when it is not three numbers > 0."""
    numbers = isinstance(spacing, (list, tuple)) and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) for s in spacing
    )
    if not numbers or len(spacing) != 3 or not all(0 < s < float("inf") for s in spacing):
        raise ValueError(f"{name} must be three numbers > 0 (mm per voxel along X, Y, Z), got {spacing!r}")
    return tuple(float(s) for s in spacing)


@dataclass
class ChannelInfo:
    """One input channel. ``normalisation``: "ct" (a fixed mapping, the same for every scan:
    ``(clip(x, *clip) - mean) / std``; the trainer stores its HU window as ``clip`` and the window's
    centre and half-width as ``mean`` and ``std``, mapping the window to [-1, 1]), "zscore" (per-scan
    z-score over the nonzero voxels), "foreground_zscore" (per-scan z-score over the voxels above a tenth
    of the 99.5th percentile, the same whatever the background holds) or "none". :mod:`veloxseg.data.transforms` applies it."""

    name: str
    group: int  # modality group index (position in group_channels)
    normalisation: str = "zscore"
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        """Raise ValueError naming the channel when the normalisation cannot be applied."""
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(
                f"channel {self.name!r}: unknown normalisation {self.normalisation!r}; use one of {NORMALISATIONS}"
            )
        if self.normalisation == "ct" and not (_is_number(self.mean) and _is_number(self.std) and self.std):
            raise ValueError(
                f"channel {self.name!r}: 'ct' normalisation needs the dataset's mean and a nonzero std, "
                f"got mean={self.mean!r}, std={self.std!r}"
            )
        if self.clip is not None:
            if not (isinstance(self.clip, (list, tuple)) and len(self.clip) == 2 and all(map(_is_number, self.clip))):
                raise ValueError(f"channel {self.name!r}: clip must be two numbers [low, high], got {self.clip!r}")
            if self.clip[0] >= self.clip[1]:
                raise ValueError(f"channel {self.name!r}: clip [low, high] needs low < high, got {list(self.clip)}")
            self.clip = tuple(self.clip)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    # share of training patches that lost a random subset of their modality groups (--modality-dropout) and how
    # the groups lost were drawn (--modality-dropout-mode; "": not recorded, files written before it was); a
    # model with modality_dropout > 0 was trained to run on any subset: model(x, present=[...])
    modality_dropout: float = 0.0
    modality_dropout_mode: str = ""
    # Provenance (veloxseg.provenance): the weights these were fine-tuned from, the notice their data asks to keep
    # with every copy (written as NOTICE beside the weights), and the cases each split's metrics cover.
    base_model: str = ""  # Hub repo id ("veloxseg/veloxseg_small.mni152_tissue") or "local-dir:PATH"; "": none
    notice: str = ""
    evaluation_cases: dict[str, int] = field(default_factory=dict)  # "validation" / "test" -> number of cases
    publication: dict[str, Any] = field(default_factory=dict)  # a published tag's facts (provenance.Publication)

    def __post_init__(self) -> None:
        """Raise ValueError naming the field when spacing, orientation or modality dropout make no sense."""
        if self.spacing is not None:
            self.spacing = check_spacing(self.spacing, "metadata spacing")
        codes = self.orientation if isinstance(self.orientation, str) else ""
        axes = sorted(axis for c in codes for axis, pair in enumerate(AXIS_CODES) if c in pair)
        if len(codes) != 3 or axes != [0, 1, 2]:
            raise ValueError(
                f"metadata orientation must be three axis codes, one of each of L/R, P/A, I/S (e.g. 'RAS'), "
                f"got {self.orientation!r}"
            )
        if not (_is_number(self.modality_dropout) and 0 <= self.modality_dropout <= 1):
            raise ValueError(f"metadata modality_dropout must be a share in [0, 1], got {self.modality_dropout!r}")
        if self.modality_dropout_mode not in ("", *MODALITY_DROPOUT_MODES):
            raise ValueError(
                f"metadata modality_dropout_mode must be one of {MODALITY_DROPOUT_MODES} (or '': not recorded), "
                f"got {self.modality_dropout_mode!r}"
            )

    def subset_training(self) -> str:
        """How the model learnt to run on a subset of its modality groups: "modality dropout 0.5 (uniform)"
        ("(mode not recorded)" for files without the mode); "" when it was not trained on subsets (or the
        file does not say: the same for metadata written before modality dropout existed)."""
        if not self.modality_dropout:
            return ""
        return f"modality dropout {self.modality_dropout:g} ({self.modality_dropout_mode or 'mode not recorded'})"

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values; without ``modality_dropout_mode`` when it is not recorded (as files
        written before it have it)."""
        values = json_ready(asdict(self))
        if not self.modality_dropout_mode:
            del values["modality_dropout_mode"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelMetadata":
        values = dict(values)
        channels = [ChannelInfo(**c) for c in values.pop("channels")]
        return cls(channels=channels, **values)

    @classmethod
    def default(cls, group_channels: tuple[int, ...], n_classes: int) -> "ModelMetadata":
        """Generic metadata for an untrained model: z-scored channels, labels named by value."""
        channels = [
            ChannelInfo(name=f"group{g}_channel{c}", group=g)
            for g, count in enumerate(group_channels)
            for c in range(count)
        ]
        labels = {"background": 0, **{f"class_{i}": i for i in range(1, n_classes)}}
        return cls(channels=channels, labels=labels)

    def problems(self, group_channels: tuple[int, ...], n_classes: int) -> list[str]:
        """Why this metadata cannot describe a model with ``group_channels`` (channels per modality group) and
        ``n_classes`` (empty: it can)."""
        found = []
        groups = [c.group for c in self.channels]  # input order: group 0's channels first
        if groups != [g for g, count in enumerate(group_channels) for _ in range(count)]:
            found.append(f"its channels have groups {groups} but the model's group_channels is {list(group_channels)}")
        if sorted(self.labels.values()) != list(range(n_classes)):
            found.append(f"its labels {self.labels} are not the values 0..{n_classes - 1} of {n_classes} classes")
        return found

    @classmethod
    def fitting(cls, values: dict[str, Any] | None, group_channels: tuple[int, ...], n_classes: int) -> "ModelMetadata":
        """``values`` (a pretrained config's metadata) when they describe a model with these groups and
        classes, else :meth:`default` (the data of a model whose inputs or classes changed is unknown)."""
        metadata = cls.from_dict(values) if values else None
        if metadata is None or metadata.problems(group_channels, n_classes):
            return cls.default(group_channels, n_classes)
        return metadata


def model_metadata(model: Any) -> ModelMetadata:
    """A model's data metadata (``model.pretrained_cfg["veloxseg"]``) when it fits its ``config``'s channels
    (``group_channels``) and classes (``n_classes``), else generic metadata for them (:meth:`ModelMetadata.fitting`)."""
    cfg, stored = model.config, getattr(model, "pretrained_cfg", {}).get("veloxseg")
    return ModelMetadata.fitting(stored, cfg.group_channels, cfg.n_classes)
