"""The VeloxSeg trainer: self-supervised pretraining, segmentation and fine-tuning with Accelerate.

``train(TrainConfig(...))`` runs one stage from start to end (or from its last checkpoint) and
returns the final validation metrics; ``veloxseg train`` (:mod:`veloxseg.train`) is its command line. Stages:

* ``pretrain``: the teachers learn to reconstruct each modality group (L_rc), optionally from a
  masked input; encoder and teachers train, labels are not used.
* ``segment``: the recipe's objective (:mod:`.recipe`): by default L_seg alone on the full-resolution
  head; with ``recipe="paper"`` the paper's L_seg + 0.5 L_rc + 2.0 L_sdkt (:mod:`veloxseg.losses`).
* ``finetune``: the same objective from pretrained weights adapted to the dataset's channels and
  classes (``create_model(..., pretrained=True, group_channels=..., n_classes=...)``).

The parts, in the order ``train()`` (:mod:`.loop`) uses them:

* :mod:`.config`: :class:`TrainConfig`, its command-line flags and :func:`resolve` (defaults, checks);
* :mod:`.run_folder`: the output folder's checks, its lock (one writer) and what ``resume`` may change;
* :mod:`.recipe`: the ``default`` and ``paper`` recipes (loss weights, deep supervision, dropout, lr);
* :mod:`.data`: the dataset, its metadata (the preprocessing saved with the model), datasets, loaders;
* :mod:`.build`: Accelerator, model, optimiser and learning-rate schedule;
* :mod:`.step`: :func:`train_step`, one forward, loss, backward and optimiser step (and the modality dropout of a step);
* :mod:`.validate`: Dice and HD95 on whole validation volumes;
* :mod:`.checkpoints`: crash-safe checkpoints, resuming, the saved models;
* :mod:`.metrics`: ``metrics.jsonl`` and the plots.

The output folder:

* ``config.json``, ``model.safetensors``, ``README.md``: the last model, Hub-ready
  (``create_model("local-dir:<output_dir>")``); ``best/``: the model of the best validation Dice.
* ``checkpoints/step_XXXXXXXX/``: training state (Accelerate ``save_state`` plus
  ``trainer_state.json``), written into a ``.tmp-`` folder and renamed when complete.
* ``metrics.jsonl`` (one JSON object per line), ``curves.png``, ``validation.png``,
  ``train_config.json``, ``logs/`` (tensorboard, when installed), ``data/`` (the demo dataset),
  ``run.lock`` while a run writes (its pid and host).
"""

from .build import build_model, build_optimizer, build_scheduler, scaled_windows
from .config import STAGES, TrainConfig, add_train_arguments, config_from_args, resolve
from .data import (
    PerSampleSeeds,
    batches,
    build_train_loader,
    build_train_set,
    class_names,
    prepare_dataset,
    training_metadata,
)
from .loop import TrainResult, train
from .recipe import RECIPES, Recipe
from .step import modality_dropout_at, train_step
from .validate import validate

__all__ = [
    "RECIPES",
    "STAGES",
    "Recipe",
    "PerSampleSeeds",
    "TrainConfig",
    "TrainResult",
    "add_train_arguments",
    "batches",
    "build_train_loader",
    "build_train_set",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "class_names",
    "config_from_args",
    "modality_dropout_at",
    "prepare_dataset",
    "resolve",
    "scaled_windows",
    "train",
    "train_step",
    "training_metadata",
    "validate",
]
