"""Validation: whole volumes segmented by sliding windows, scored by Dice and HD95."""

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from monai.data import DataLoader
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.transforms import ResizeWithPadOrCrop

from ..data.datasets import DatasetSpec
from ..data.transforms import IMAGE, eval_transforms
from ..metadata import ModelMetadata
from ..model import VeloxSeg
from .config import TrainConfig, resolve
from .data import build_datasets, build_loaders, class_names, plain
from .step import mask_random_patches


@torch.no_grad()
def validate(
    model: VeloxSeg, loader: DataLoader, accelerator: Accelerator, config: TrainConfig, class_names: list[str]
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Sliding-window inference on whole validation volumes; Dice per foreground class and their mean,
    and HD95 (mm; the mean over cases where both prediction and label are non-empty).

    Returns (metrics, example): example holds the first case's ``image`` (C, D, H, W), ``label`` and
    ``prediction`` (D, H, W) for the validation plot.
    """
    model.eval()
    n_classes = model.config.n_classes
    dice_metric = DiceMetric(include_background=False, reduction="none")
    hd95_metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    dices, hd95s, example = [], [], {}
    for batch in loader:
        image, label = plain(batch["image"]), plain(batch["label"])
        affine = torch.as_tensor(batch["image"].affine, dtype=torch.float64).cpu().reshape(-1, 4, 4)
        spacing = torch.linalg.vector_norm(affine[:, :3, :3], dim=1).tolist()  # voxel size (mm) per axis
        with accelerator.autocast():
            logits = sliding_window_inference(
                image, model.config.roi_size, config.sw_batch_size, model, overlap=config.sw_overlap
            )
        prediction = logits.argmax(1, keepdim=True)
        pred_onehot, label_onehot = (F.one_hot(t[:, 0].long(), n_classes).movedim(-1, 1) for t in (prediction, label))
        with warnings.catch_warnings():  # empty predictions early in training: counted as NaN/inf below
            warnings.simplefilter("ignore")
            hd95 = hd95_metric(pred_onehot, label_onehot, spacing=spacing)
        dices.append(dice_metric(pred_onehot, label_onehot))
        hd95s.append(hd95)
        if not example:
            example = {"image": image[0].float().cpu().numpy(), "label": label[0, 0].cpu().numpy(),
                       "prediction": prediction[0, 0].cpu().numpy()}  # fmt: skip
    dice, hd95 = (accelerator.gather_for_metrics(torch.cat(values)).float().cpu() for values in (dices, hd95s))
    per_class = torch.nanmean(dice, 0)
    metrics = {"val/dice": float(torch.nanmean(per_class))}
    metrics.update({f"val/dice_{name}": float(value) for name, value in zip(class_names, per_class)})
    finite = hd95[torch.isfinite(hd95)]
    metrics["val/hd95"] = float(finite.mean()) if finite.numel() else float("nan")
    model.train()
    return metrics, example


def score_test_cases(model: VeloxSeg, spec: DatasetSpec) -> dict[str, float]:
    """``validate``'s metrics of ``model`` on the dataset's labelled test cases (imagesTs/labelsTs), each
    whole volume preprocessed as the model's metadata says; named ``test/dice``, ``test/dice_<class>``,
    ``test/hd95``. Raises ValueError when the dataset has no labelled test cases."""
    if not spec.test or any(case.label is None for case in spec.test):
        raise ValueError(f"{spec.root}: no labelled test cases (imagesTs and labelsTs)")
    metadata = ModelMetadata.from_dict(model.pretrained_cfg["veloxseg"])
    config = resolve(TrainConfig(data=str(spec.root), roi=model.config.roi_size))
    _, test_set = build_datasets([], spec.test, metadata, config, config.roi)
    _, test_loader = build_loaders(test_set, test_set, config)
    metrics, _ = validate(model, test_loader, Accelerator(cpu=True), config, class_names(spec))
    return {name.replace("val/", "test/", 1): value for name, value in metrics.items()}


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
