r"""Train VeloxSeg with Accelerate: ``veloxseg train``, ``python -m veloxseg.train``, or under Accelerate's
launcher, ``accelerate launch -m veloxseg.train`` (needs ``pip install "veloxseg[train]"``).

With no data, a synthetic PET/CT lesion dataset is generated into the output folder and a short
segmentation run finishes in a few minutes on a laptop CPU:

    veloxseg train --output-dir runs/demo

Everything runs the same under ``accelerate launch`` (no config file needed), on several GPUs
with DDP, or as several CPU processes under ``torchrun --nproc_per_node 2 -m veloxseg.train --cpu ...``:

    accelerate launch --multi_gpu --num_processes 2 -m veloxseg.train --data /data/Dataset001_Lesions \
        --model veloxseg_small --max-steps 25000 --mixed-precision bf16 --output-dir runs/lesions

The default recipe (``--recipe default``) trains the recommended ``veloxseg_small_hr`` with L_seg on
its full-resolution head, no teachers and no dropout: what learned best at short CPU budgets
(benchmarks/experiments/recipe/). The paper's recipe (deep supervision, teachers, L_seg + 0.5 L_rc
+ 2 L_sdkt, lr 2.5e-4) is one flag away, here in two stages, then fine-tuning the result on another dataset:

    veloxseg train --stage pretrain --data DIR --model veloxseg_small --output-dir runs/pretrain
    veloxseg train --stage segment --recipe paper --data DIR --model local-dir:runs/pretrain \
        --pretrained --one-way-sdkt --output-dir runs/segment
    veloxseg train --stage finetune --data OTHER_DIR --model local-dir:runs/segment --output-dir runs/ft

A run killed at any moment continues where its last checkpoint left it with ``--resume``. The
output folder is a Hub-ready model folder: ``veloxseg.create_model("local-dir:runs/demo")``.
"""

import argparse
import shlex
import sys

from accelerate import PartialState

from .training import add_train_arguments, config_from_args, train

HELP = "train, pretrain or fine-tune a VeloxSeg model with Accelerate"


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``veloxseg train`` subcommand: one flag per :class:`veloxseg.training.TrainConfig` field."""
    parser = subparsers.add_parser(
        "train", help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_train_arguments(parser)
    parser.set_defaults(func=lambda args: run_train(args, shlex.join(["veloxseg", *sys.argv[1:]])))
    return parser


def run_train(args: argparse.Namespace, command: str) -> int:
    """Train with the parsed flags; ``command`` (the command line) is recorded in the model card.
    Prints one summary, from the main process. Raises ValueError / FileNotFoundError / FileExistsError
    on bad flags or data, before anything is trained, and FloatingPointError when training diverges."""
    result = train(config_from_args(args, command=command))
    state = PartialState()  # under accelerate launch, one summary from the main process
    metrics = ", ".join(f"{name.removeprefix('val/')} {value:.4f}" for name, value in result.metrics.items())
    state.print(f"finished at step {result.step}" + (f": validation {metrics}" if metrics else ""))
    if result.best_metrics:
        state.print(
            f"best validation Dice {result.best_metrics['val/dice']:.4f} (model in {result.output_dir / 'best'})"
        )
    state.print(f'model folder: {result.output_dir} (veloxseg.create_model("local-dir:{result.output_dir}"))')
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m veloxseg.train") -> int:
    """``python -m veloxseg.train [flags]``; ``prog``: how the command is named in its help and card.
    Bad flags or data exit with a one-line error (status 1), never a traceback."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_train_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        return run_train(args, shlex.join([*shlex.split(prog), *argv]))
    except (ValueError, FileExistsError, FileNotFoundError, FloatingPointError) as err:  # bad flags or data, NaNs
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    sys.exit(main())
