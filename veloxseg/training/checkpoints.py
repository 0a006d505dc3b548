"""Crash-safe checkpoints of the training state, and the saved models.

A checkpoint ``checkpoints/step_XXXXXXXX/`` is Accelerate's ``save_state`` (model, optimiser,
schedule, random states) plus ``trainer_state.json`` (step, best metrics), written last into a
temporary folder that is renamed when complete: a folder without it, or a temporary one, is what a
kill left behind and is never resumed from.
"""

import dataclasses
import json
import re
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..hub import nonfinite_tensors
from ..io import atomic_folder, temporary_folder
from ..metadata import ModelMetadata
from ..model import VeloxSeg

CHECKPOINT_PREFIX = "step_"
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: a folder without it is incomplete


def new_state(total_steps: int) -> dict[str, Any]:
    """The trainer state of a run that has not started: the step reached, the run's length, the last and
    the best validation metrics, the steps skipped for a NaN/inf loss or gradient."""
    return {
        "step": 0, "total_steps": total_steps, "best_dice": -1.0, "best_step": None, "metrics": {}, "best_metrics": {},
        "nonfinite_steps": 0,
    }  # fmt: skip


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint under ``folder`` (temporary and incomplete folders are skipped)."""
    complete = [
        p
        for p in folder.glob(f"{CHECKPOINT_PREFIX}*")
        if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name) and (p / TRAINER_STATE).is_file()
    ]
    return max(complete, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), default=None)


def save_checkpoint(accelerator: Accelerator, folder: Path, state: dict[str, Any], keep: int) -> Path:
    """Save the training state of ``state["step"]`` into a temporary folder, rename it to
    ``step_XXXXXXXX`` and delete all but the ``keep`` newest checkpoints. All processes call this;
    the main process clears, completes and renames the folder, every process writes its part."""
    final = folder / f"{CHECKPOINT_PREFIX}{state['step']:08d}"
    main = accelerator.is_main_process
    with atomic_folder(final) if main else nullcontext(temporary_folder(final)) as tmp:
        accelerator.wait_for_everyone()  # the main process has cleared a leftover temporary folder
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every process has written its part
        if main:
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
    if main:
        checkpoints = sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: p.name)
        for old in [p for p in checkpoints if p != final][: max(0, len(checkpoints) - keep)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, total_steps: int) -> dict[str, Any]:
    """Restore the training state saved in ``checkpoint`` and return its trainer state. Raises
    ValueError when the checkpoint belongs to a run of another length (its schedule would not fit)."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    if state["total_steps"] != total_steps:
        raise ValueError(
            f"{checkpoint} belongs to a run of {state['total_steps']} steps, not {total_steps}: resume with the "
            "same max_steps / epochs, batch size and data"
        )
    accelerator.load_state(str(checkpoint))
    accelerator.print(f"resumed from {checkpoint} (step {state['step']})")
    return state


def save_model(
    accelerator: Accelerator, model: VeloxSeg, folder: Path, metadata: ModelMetadata, metrics: dict[str, float]
) -> None:
    """Write ``model`` as a Hub-ready folder with ``metadata`` and its validation ``metrics`` (each file
    renamed into place when complete). All processes call this; the main process writes. Raises
    FloatingPointError, writing nothing, when a weight is NaN or infinite."""
    bad = nonfinite_tensors(model.state_dict())
    if bad:
        raise FloatingPointError(
            f"the model's weights hold NaN or infinite values ({len(bad)} tensors, e.g. {bad[0]}): {folder} not "
            f"written; "
            f"the training diverged: lower the learning rate or clip the gradients (max_grad_norm)"
        )
    if accelerator.is_main_process:
        metrics = {name.replace("/", "_"): value for name, value in metrics.items()}
        model.save_pretrained(folder, metadata=dataclasses.replace(metadata, metrics=metrics))
    accelerator.wait_for_everyone()
