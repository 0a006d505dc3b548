"""Scoring: whole cases segmented by :func:`veloxseg.predict.predict_probabilities` (the path of
``veloxseg predict``: the model's preprocessing, Gaussian sliding windows, probabilities mapped back
to each scan's own grid) and compared with their labels there, by Dice and HD95."""

import itertools
import warnings
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.transforms import ResizeWithPadOrCrop

from ..data.datasets import Case, DatasetSpec
from ..data.transforms import IMAGE, eval_transforms
from ..metadata import ModelMetadata
from ..model import VeloxSeg
from ..predict import load_scan, model_metadata, predict_probabilities
from .data import class_names, plain
from .step import mask_random_patches


@torch.no_grad()
def score_cases(
    model: torch.nn.Module,
    cases: Sequence[Case],
    classes: Sequence[str],
    metadata: ModelMetadata | None = None,
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    present: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
    """Segment each labelled case as ``veloxseg predict`` does and score it on its own voxel grid.
    ``present``: give the model the files of these modality groups only (one file per channel).

    Returns (dice, hd95, example): dice and hd95 (mm) are (cases, len(classes)) with NaN where a class
    is absent from both label and prediction (Dice) or from either (HD95); example holds the first
    case's ``image`` (C, X, Y, Z), ``label`` and ``prediction`` (X, Y, Z) for the validation plot.
    """
    dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    hd95_metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    n_classes = len(classes) + 1
    dices, hd95s, example = [], [], {}
    channels = (metadata or model_metadata(model)).channels
    for case in cases:
        if case.label is None:
            raise ValueError(f"case {case.case_id} has no label to score against")
        files = [f for f, c in zip(case.images, channels) if present is None or c.group in present]
        scan = load_scan(files)
        probs = predict_probabilities(
            model, scan, overlap=overlap, sw_batch_size=sw_batch_size, metadata=metadata, present=present
        )
        prediction = probs.argmax(0)
        label = torch.from_numpy(np.asarray(nib.load(case.label).dataobj).astype(np.int64).reshape(prediction.shape))
        pred_onehot, label_onehot = (F.one_hot(t[None], n_classes).movedim(-1, 1) for t in (prediction, label))
        spacing = np.linalg.norm(scan.affine[:3, :3], axis=0).tolist()  # voxel size (mm) per axis
        with warnings.catch_warnings():  # empty predictions early in training: counted as NaN/inf below
            warnings.simplefilter("ignore")
            hd95s.append(hd95_metric(pred_onehot, label_onehot, spacing=spacing))
            dices.append(dice_metric(pred_onehot, label_onehot))
        if not example:
            example = {"image": scan.data, "label": label.numpy(), "prediction": prediction.numpy()}
    empty = torch.empty(0, len(classes))
    return (torch.cat(dices) if dices else empty), (torch.cat(hd95s) if hd95s else empty), example


def summarise(dice: torch.Tensor, hd95: torch.Tensor, classes: Sequence[str], prefix: str) -> dict[str, float]:
    """``prefix/dice`` (mean over classes of the per-class mean over cases), ``prefix/dice_<class>``,
    ``prefix/hd95`` (mm, the mean over the finite case-class values) and ``prefix/cases``."""
    per_class = torch.nanmean(dice.float(), 0)
    metrics = {f"{prefix}/dice": float(torch.nanmean(per_class))}
    metrics.update({f"{prefix}/dice_{name}": float(value) for name, value in zip(classes, per_class)})
    finite = hd95[torch.isfinite(hd95)]
    metrics[f"{prefix}/hd95"] = float(finite.mean()) if finite.numel() else float("nan")
    metrics[f"{prefix}/cases"] = float(dice.shape[0])
    return metrics


def validate(
    model: VeloxSeg, cases: Sequence[Case], accelerator: Accelerator, metadata: ModelMetadata, classes: list[str],
    sw_batch_size: int = 1, overlap: float = 0.5,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:  # fmt: skip
    """``val/`` metrics of :func:`score_cases` on the validation cases, shared among the processes
    (each scores every ``num_processes``-th case), preprocessed with the training ``metadata``."""
    mine = list(cases)[accelerator.process_index :: accelerator.num_processes]
    model.eval()
    with accelerator.autocast():
        dice, hd95, example = score_cases(model, mine, classes, metadata, overlap=overlap, sw_batch_size=sw_batch_size)
    if accelerator.num_processes > 1:  # each process scored its own cases: every row, once
        dice, hd95 = (torch.cat(accelerator.gather_object([t])) for t in (dice, hd95))
    model.train()
    return summarise(dice, hd95, classes, "val"), example


def score_test_cases(model: VeloxSeg, spec: DatasetSpec, present: Sequence[int] | None = None) -> dict[str, float]:
    """The ``test/`` metrics of ``model`` on the dataset's labelled test cases (imagesTs/labelsTs),
    segmented exactly as ``veloxseg predict`` segments them (given the files of the modality groups
    ``present`` only, when set). Raises ValueError when the dataset has no labelled test cases."""
    if not spec.test or any(case.label is None for case in spec.test):
        raise ValueError(f"{spec.root}: no labelled test cases (imagesTs and labelsTs)")
    classes = class_names(spec)
    dice, hd95, _ = score_cases(model.eval(), spec.test, classes, present=present)
    return summarise(dice, hd95, classes, "test")


def score_modality_subsets(model: VeloxSeg, spec: DatasetSpec) -> dict[str, float]:
    """``test/dice@<channels>`` for every proper non-empty subset of the model's modality groups (e.g.
    ``test/dice@PET``): the test Dice of a model trained with modality dropout given those files only."""
    channels = model_metadata(model).channels
    groups = range(len(model.config.group_channels))
    scores = {}
    for size in range(1, len(groups)):
        for subset in itertools.combinations(groups, size):
            names = "+".join(c.name for c in channels if c.group in subset)
            scores[f"test/dice@{names}"] = score_test_cases(model, spec, present=subset)["test/dice"]
    return scores


@torch.no_grad()
def score_reconstruction(model: VeloxSeg, spec: DatasetSpec, mask_ratio: float, mask_patch: int) -> dict[str, float]:
    """Mean squared error of the teachers' reconstruction, the pretraining objective, on held-out scans:
    the centre ``roi_size`` crop of each test case (else training case) of ``spec``, preprocessed as the
    model's metadata says, with ``mask_ratio`` of its ``mask_patch``^3 cubes zeroed (seeded, so runs
    compare); ``test/masked_rc_mse``, beside ``test/masked_input_mse``, the error of the masked input
    itself (what copying the visible voxels scores). Raises ValueError for a model without teachers."""
    if not model.config.teachers:
        raise ValueError("the model has no teachers, so nothing reconstructs its input")
    metadata = ModelMetadata.from_dict(model.pretrained_cfg["veloxseg"])
    load, crop = eval_transforms(metadata), ResizeWithPadOrCrop(model.config.roi_size)
    errors, copy_errors = [], []
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model.train()  # the teachers run in training mode only; nothing here is trained
        for case in spec.test or spec.training:
            image = plain(crop(load({IMAGE: list(case.images)})[IMAGE]))[None]
            masked = mask_random_patches(image, mask_ratio, mask_patch) if mask_ratio else image
            errors.append(F.mse_loss(model(masked).reconstruction, image).item())
            copy_errors.append(F.mse_loss(masked, image).item())
        model.eval()
    return {"test/masked_rc_mse": float(np.mean(errors)), "test/masked_input_mse": float(np.mean(copy_errors))}
