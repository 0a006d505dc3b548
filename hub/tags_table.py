"""The published tags as one markdown table: data, budget, CPU hours and held-out metrics of each.

    python hub/tags_table.py [--out benchmarks/results/tags.md]

Read from each tag's folder (hub/<variant>.<tag>/): the metrics in its config.json, the budget and
the CPU hours from the tag's section of its card (hub/make_tag.py wrote both). Tags in the order of
``veloxseg.variants.PUBLISHED``, so each variant's default tag comes first.
"""

import argparse
import json
import re
import sys
from pathlib import Path

from veloxseg import hub
from veloxseg.io import atomic_file
from veloxseg.variants import PUBLISHED

HUB_DIR = Path(__file__).resolve().parent


def held_out(metrics: dict[str, float]) -> str:
    """The tag's held-out numbers: test Dice (and HD95) for segmentation, the reconstruction error
    beside the masked input's own for self-supervised tags."""
    if "test_masked_rc_mse" in metrics:
        return f"masked MSE {metrics['test_masked_rc_mse']:.3f} (masked input: {metrics['test_masked_input_mse']:.3f})"
    dice = f"Dice {metrics['test_dice']:.3f}"
    return f"{dice}, HD95 {metrics['test_hd95']:.1f} mm" if "test_hd95" in metrics else dice


def row(name: str, hub_dir: Path) -> str:
    """One tag's table row."""
    folder = hub_dir / name
    metadata = json.loads((folder / hub.CONFIG_NAME).read_text())["pretrained_cfg"]["veloxseg"]
    card = (folder / hub.CARD_NAME).read_text()
    budget = re.search(r"seed \d+: (.+?), learning rate", card)
    hours = re.search(r"Training cost: ([\d.]+) CPU hours", card)
    default = " (default)" if next(t for t in PUBLISHED if t.split(".")[0] == name.split(".")[0]) == name else ""
    data = metadata["training_data"].split(" (")[0]
    return (
        f"| `{name}`{default} | {data} | {budget.group(1) if budget else '?'} | "
        f"{hours.group(1) if hours else '?'} | {held_out(metadata['metrics'])} |"
    )


def table(hub_dir: Path = HUB_DIR) -> str:
    """Every published tag, one row each."""
    lines = [
        "| tag | training data | budget | CPU hours | held-out |",
        "| --- | --- | --- | --- | --- |",
        *(row(name, hub_dir) for name in PUBLISHED),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the table, with a heading, to this file")
    args = parser.parse_args(argv)
    text = table()
    print(text, end="")
    if args.out:
        with atomic_file(args.out) as tmp:
            tmp.write_text(
                "# Published tags\n\nMade by `bash hub/make_tags.sh data|train|tags` on a 2-core CPU machine, one torch "
                "thread per run. CPU hours: user + system time of the training process (GNU time). Held-out: "
                "test cases the run never saw (segmentation tags: the task's imagesTs; self-supervised tags: the "
                "Colin27 T1 test scans).\n\n" + text
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
