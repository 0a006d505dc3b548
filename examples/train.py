r"""Train VeloxSeg with Accelerate.

With no data, a synthetic PET/CT lesion dataset is generated into the output folder and a short
segmentation run finishes in a few minutes on a laptop CPU:

    python examples/train.py --output-dir runs/demo

Everything runs the same under ``accelerate launch`` (no config file needed), on several GPUs
with DDP, or as several CPU processes under ``torchrun --nproc_per_node 2 examples/train.py --cpu ...``:

    accelerate launch --multi_gpu --num_processes 2 examples/train.py --data /data/Dataset001_Lesions \
        --model veloxseg_small --max-steps 25000 --mixed-precision bf16 --output-dir runs/lesions

The default recipe (``--recipe default``) trains the recommended ``veloxseg_small_hr`` with L_seg on
its full-resolution head, no teachers and no dropout: what learned best at short CPU budgets
(benchmarks/results/accuracy.md). The paper's recipe (deep supervision, teachers, L_seg + 0.5 L_rc
+ 2 L_sdkt, lr 2.5e-4) is one flag away, here in two stages, then fine-tuning the result on another dataset:

    python examples/train.py --stage pretrain --data DIR --model veloxseg_small --output-dir runs/pretrain
    python examples/train.py --stage segment --recipe paper --data DIR --model local-dir:runs/pretrain \
        --pretrained --one-way-sdkt --output-dir runs/segment
    python examples/train.py --stage finetune --data OTHER_DIR --model local-dir:runs/segment --output-dir runs/ft

A run killed at any moment continues where its last checkpoint left it with ``--resume``. The
output folder is a Hub-ready model folder: ``veloxseg.create_model("local-dir:runs/demo")``.
"""

import argparse
import shlex
import sys

from accelerate import PartialState

from veloxseg.training import add_train_arguments, config_from_args, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    args = parser.parse_args()
    try:
        config = config_from_args(args, command=shlex.join(["python", *sys.argv]))
        result = train(config)
    except (ValueError, FileExistsError, FileNotFoundError, FloatingPointError) as err:  # bad flags or data, NaNs
        sys.exit(f"error: {err}")

    state = PartialState()  # under accelerate launch, one summary from the main process
    metrics = ", ".join(f"{name.removeprefix('val/')} {value:.4f}" for name, value in result.metrics.items())
    state.print(f"finished at step {result.step}" + (f": validation {metrics}" if metrics else ""))
    if result.best_metrics:
        state.print(
            f"best validation Dice {result.best_metrics['val/dice']:.4f} (model in {result.output_dir / 'best'})"
        )
    state.print(f'model folder: {result.output_dir} (veloxseg.create_model("local-dir:{result.output_dir}"))')


if __name__ == "__main__":
    main()
