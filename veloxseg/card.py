"""Model cards (the README.md of a Hub repo) generated from a model and its 3-D metadata."""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .metadata import ModelMetadata
from .model import VeloxSeg
from .provenance import Publication, hub_base_model, split_of
from .variants import PAPER_TITLE

PIPELINE_TAG = "image-segmentation"
TAGS = ["veloxseg", "medical-imaging", "image-segmentation", "3d", "pytorch", "safetensors"]

CITATION = f"""\
@inproceedings{{veloxseg2026,
  title     = {{{PAPER_TITLE}}},
  booktitle = {{International Conference on Learning Representations (ICLR)}},
  year      = {{2026}}
}}"""


def model_card(model: VeloxSeg, metadata: ModelMetadata, architecture: str, repo_id: str | None = None) -> ModelCard:
    """The card of ``model``: Hub front matter (license, base_model, tags, library_name, pipeline_tag,
    datasets, metrics, and a ``model-index`` with the metrics by split) and sections on usage,
    architecture, preprocessing, labels, training, evaluation, limitations and license."""
    results = eval_results(metadata)
    data = ModelCardData(
        license=metadata.license,
        base_model=hub_base_model(metadata.base_model),
        library_name="veloxseg",
        pipeline_tag=PIPELINE_TAG,
        tags=TAGS,
        datasets=list(metadata.datasets),
        metrics=sorted(metadata.metrics),
        model_name=(repo_id or architecture) if results else None,  # the model-index's name
        eval_results=results or None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(model, metadata, architecture, repo_id)}")


def eval_results(metadata: ModelMetadata) -> list[EvalResult]:
    """The metrics as the Hub's evaluation results (the card's ``model-index``): task
    image-segmentation, dataset the first of ``metadata.datasets`` ("custom" when none is recorded),
    one result per metric, its split read from the name (``val_*``: validation, the cases that chose
    the checkpoint; ``test_*``: test; else held-out) with the number of cases it covers as the
    dataset's ``args`` (``cases``), the metric's name without the split prefix as its type. A held-out
    metric is on other data, named ``<dataset>_<metric>`` (``colin27_dice_3mm``): that dataset is its own."""
    trained_on = metadata.datasets[0] if metadata.datasets else "custom"
    results = []
    for name, value in sorted(metadata.metrics.items()):
        split, metric = split_of(name)
        dataset = trained_on
        if split == "held-out" and "_" in metric:
            dataset, metric = metric.split("_", 1)
        cases = metadata.evaluation_cases.get(split)
        results.append(
            EvalResult(
                task_type=PIPELINE_TAG, dataset_type=dataset, dataset_name=f"{dataset} ({split})", dataset_split=split,
                dataset_args={"cases": cases} if cases else None, metric_type=metric, metric_name=name,
                metric_value=value,
            )  # fmt: skip
        )
    return results


def _table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table of ``rows`` under ``header``."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


BODY_TEMPLATE = """\
# {title}

VeloxSeg ({architecture}) for 3-D segmentation of {targets} from {channels}. VeloxSeg (ICLR 2026) pairs a
Johnson-Lindenstrauss-guided convolution stream with a paired-window attention stream per modality
group; reconstruction teachers (SDKT) are used in training only.
{tag_section}
## Usage

```python
import torch
import veloxseg

model = veloxseg.create_model("{model_name}", pretrained=True).eval()
x = torch.randn(1, {total_channels}, {roi})  # a scan preprocessed as below, cropped to the ROI size
logits = model(x)  # (1, {n_classes}, {roi})
```

Whole scans go through sliding windows of the ROI size: `veloxseg predict --help`. To fine-tune on
other channels, classes or ROI size, pass them as overrides (`group_channels=..., n_classes=..., roi_size=...`):
compatible weights are kept and the rest adapted or re-initialised (see `veloxseg.adapt`).

## Model

{model_table}

## Preprocessing

Orientation {orientation}, voxel spacing {spacing}. Channels, in input order:

{channel_table}

## Labels

{label_table}

## Training

Data: {training_data}

Base model: {base}

Datasets: {datasets}{subsets}

Command:

{command}

## Evaluation

{evaluation}

## Limitations

- Research use only: not a medical device and not validated for clinical decisions.
- Expect lower accuracy on scanners, protocols, populations or anatomy unlike the training data.
- Inputs must be preprocessed exactly as above (orientation, spacing, per-channel normalisation).

## Citation

```bibtex
{citation}
```

## License

{license}{notice}
"""
"""The card's text below the front matter; ``_body`` fills its named fields, one helper per section."""


def _body(model: VeloxSeg, metadata: ModelMetadata, architecture: str, repo_id: str | None) -> str:
    """The card's Markdown sections, ``BODY_TEMPLATE`` filled from the model and its metadata."""
    return BODY_TEMPLATE.format(
        title=repo_id or architecture,
        architecture=architecture,
        targets=", ".join(name for name, value in _labels_in_order(metadata) if value != 0) or "-",
        channels=_channel_names(metadata),
        tag_section=_tag_section(metadata, repo_id),
        **_usage_fields(model, repo_id),
        model_table=_model_table(model, architecture),
        **_preprocessing_fields(metadata),
        **_training_fields(metadata),
        evaluation=_evaluation(metadata),
        citation=CITATION,
        license=metadata.license,
        notice=(
            "\n\nThe data or base weights ask that their notice be kept with every copy: `NOTICE` beside these weights."
            if metadata.notice else ""
        ),  # fmt: skip
    )


def _labels_in_order(metadata: ModelMetadata) -> list[tuple[str, int]]:
    """The label names and values, by value."""
    return sorted(metadata.labels.items(), key=lambda kv: kv[1])


MODALITY_DROPOUT_MEANINGS = {
    "uniform": "Uniform: that share of the training patches lost one of the non-empty proper subsets of the "
    "modality groups, each equally likely.",
    "per-group": "Per-group: each modality group of each training patch was lost on its own coin of that "
    "probability (a patch left with none kept one).",
}


def _group_names(metadata: ModelMetadata) -> str:
    """The modality groups, comma-separated, each named by its channels ("T1w+T2w" for a two-channel group)."""
    groups: dict[int, list[str]] = {}
    for channel in metadata.channels:
        groups.setdefault(channel.group, []).append(channel.name)
    return ", ".join("+".join(names) for names in groups.values())


def _channel_names(metadata: ModelMetadata) -> str:
    """The input channels' names, comma-separated, in input order."""
    return ", ".join(c.name for c in metadata.channels)


def _roi(model: VeloxSeg) -> str:
    """The model's ROI size (D, H, W), comma-separated."""
    return ", ".join(map(str, model.config.roi_size))


def _usage_fields(model: VeloxSeg, repo_id: str | None) -> dict[str, object]:
    """The Usage section's fields: the name to load the model by and the input and output shapes."""
    return {
        "model_name": f"hf-hub:{repo_id}" if repo_id else "local-dir:/path/to/this/folder",
        "total_channels": model.config.in_channels,
        "roi": _roi(model),
        "n_classes": model.config.n_classes,
    }


def _model_table(model: VeloxSeg, architecture: str) -> str:
    """The Model section: architecture, parameter counts, ROI size, modality groups and classes."""
    cfg = model.config
    return _table(
        ["", ""],
        [
            ["architecture", architecture],
            ["parameters (inference path)", f"{model.inference_parameters():,}"],
            ["parameters (with training-only teachers and heads)", f"{sum(p.numel() for p in model.parameters()):,}"],
            ["ROI size (D, H, W voxels)", _roi(model)],
            ["modality groups (channels per group)", list(cfg.group_channels)],
            ["classes", cfg.n_classes],
        ],
    )


def _preprocessing_fields(metadata: ModelMetadata) -> dict[str, str]:
    """The Preprocessing and Labels sections' fields: orientation, spacing, the channel and label tables."""
    channel_rows = [
        [i, c.name, c.group, c.normalisation, *("-" if v is None else v for v in (c.clip, c.mean, c.std))]
        for i, c in enumerate(metadata.channels)
    ]
    spacing = " x ".join(f"{s:g}" for s in metadata.spacing) + " mm" if metadata.spacing else "native (no resampling)"
    return {
        "orientation": metadata.orientation,
        "spacing": spacing,
        "channel_table": _table(["channel", "name", "group", "normalisation", "clip", "mean", "std"], channel_rows),
        "label_table": _table(["value", "name"], [[v, k] for k, v in _labels_in_order(metadata)]),
    }


def _training_fields(metadata: ModelMetadata) -> dict[str, str]:
    """The Training section's fields: data, base model, datasets, modality dropout and command."""
    trained = metadata.subset_training()
    subsets = (
        f"\n\nTrained with {trained}: segments any non-empty subset of {_group_names(metadata)} "
        f"(`model(x, present=[...])`, or `veloxseg predict` with only some of the channel files). "
        f"{MODALITY_DROPOUT_MEANINGS.get(metadata.modality_dropout_mode, '')}".rstrip()
        if trained
        else ""
    )
    return {
        "training_data": metadata.training_data or "not recorded.",
        "base": f"Fine-tuned from `{metadata.base_model}`." if metadata.base_model else "Trained from scratch.",
        "datasets": ", ".join(metadata.datasets) or "-",
        "subsets": subsets,
        "command": f"```bash\n{metadata.training_command}\n```" if metadata.training_command else "Not recorded.",
    }


def _evaluation(metadata: ModelMetadata) -> str:
    """The Evaluation section: one row per metric with its split and number of cases, and a caveat on
    validation metrics."""
    if not metadata.metrics:
        return "No evaluation metrics were recorded for these weights."
    rows = []
    for metric, value in sorted(metadata.metrics.items()):
        split, _ = split_of(metric)
        rows.append([metric, f"{value:.4g}", split, metadata.evaluation_cases.get(split, "not recorded")])
    caveat = (
        "\n\nValidation metrics come from the cases that chose the checkpoint: they are not an independent "
        "test; only the test split is." if any(split_of(n)[0] == "validation" for n in metadata.metrics) else ""
    )  # fmt: skip
    return _table(["metric", "value", "split", "cases"], rows) + caveat


def _tag_section(metadata: ModelMetadata, repo_id: str | None) -> str:
    """A published tag's section (its metadata has a publication; ``repo_id``: ORG/<variant>.<tag>)."""
    if not (metadata.publication and repo_id):
        return ""
    name, made = repo_id.split("/", 1)[1], Publication(**metadata.publication)
    cost = f"{made.cpu_hours:.2f} CPU hours" if made.cpu_hours is not None else "CPU time not recorded"
    notice = " Origins and licenses of the data: `NOTICE` in this folder." if metadata.notice else ""
    data = f"`{made.data_command}`" if made.data_command else "see the training data above"
    return f"""
## This tag: `{name}`

{made.about}

```python
import veloxseg
model = veloxseg.create_model("{name}", pretrained=True)  # or timm.create_model(...)
```

- Hub repo: `{repo_id}`; a copy ships with the veloxseg package (the offline fallback).
- Training data: {metadata.training_data}.{notice}
- Stage `{made.stage}`, recipe `{made.recipe}`, seed {made.seed}: {made.budget}, learning rate {made.lr:g}.
- Training cost: {cost}; machine: {made.machine}.
- Data made with: {data}
- Command: `{metadata.training_command}`
- Intended use: research, a starting point for fine-tuning (`examples/train.py --stage finetune --model {name}`). \
Not a medical device, not for clinical use. The data is synthetic or derived from one template image (deformed \
copies, or images synthesised from its tissue maps): expect lower accuracy on real scans of other scanners, \
protocols and anatomy.
"""
