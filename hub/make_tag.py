"""Turn a finished training run into the folder of a published tag, hub/<variant>.<tag>/.

    python hub/make_tag.py RUN_DIR veloxseg_small.mni152_tissue --test-data DIR --notice DIR/NOTICE.txt \\
        --time-log RUN.log --about "What the weights are for." --data-command "python examples/..."

Writes config.json and model.safetensors (the run's model, through ``save_pretrained``), with the
test-set metrics of ``--test-data`` added to the run's validation metrics (Dice on whole imagesTs
volumes, ``score_test_cases``; for a ``pretrain`` run, the masked reconstruction error on its scans,
``score_reconstruction``), and README.md: the trainer's model card plus a section on this tag (what it
is, the data with its origin and license, the command, steps, CPU time and hardware, intended use and
limitations). ``--notice`` is copied as NOTICE. Then prints the SHA-256 entry for
``veloxseg.variants.PUBLISHED``; check the folder with ``hub/publish.py``.
"""

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path

from publish import registry_entry  # hub/publish.py, beside this script

import veloxseg
from veloxseg import hub
from veloxseg.data.datasets import read_dataset
from veloxseg.io import atomic_folder
from veloxseg.metadata import ModelMetadata
from veloxseg.training.validate import score_reconstruction, score_test_cases
from veloxseg.variants import HUB_ORG

HUB_DIR = Path(__file__).resolve().parent


def cpu_hours(time_log: Path) -> float:
    """User + system CPU hours that GNU time (``/usr/bin/time -v``) reported in ``time_log`` (all its runs:
    a resumed run has several)."""
    text = time_log.read_text(errors="replace")
    seconds = [float(s) for s in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)]
    if not seconds:
        raise ValueError(f"{time_log}: no GNU time report (run the trainer under /usr/bin/time -v)")
    return sum(seconds) / 3600


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def tag_section(
    name: str, run: dict, metadata: ModelMetadata, about: str, hours: float | None, notice: bool, data_command: str
) -> str:
    """The card's section on this tag."""
    steps = run["max_steps"]
    budget = f"{steps} steps of {run['batch_size']} patches of {'x'.join(map(str, run['roi'] or ['model ROI']))}"
    cost = f"{hours:.2f} CPU hours" if hours is not None else "CPU time not recorded"
    threads = run.get("threads") or os.environ.get("OMP_NUM_THREADS", "default")  # hub/make_tags.sh sets both alike
    lines = [
        f"## This tag: `{name}`",
        "",
        about,
        "",
        "```python",
        "import veloxseg",
        f'model = veloxseg.create_model("{name}", pretrained=True)  # or timm.create_model(...)',
        "```",
        "",
        f"- Hub repo: `{HUB_ORG}/{name}`; a copy ships with the veloxseg package (the offline fallback).",
        f"- Training data: {metadata.training_data}."
        + (" Origins and licenses of the data: `NOTICE` in this folder." if notice else ""),
        (f"- Stage `{run['stage']}`, recipe `{run['recipe']}`, seed {run['seed']}: {budget}, learning rate "
        f"{run['lr']:g}."),
        f"- Training cost: {cost} on a {cpu_name()} ({threads} torch thread(s), no GPU).",
        f"- Data made with: `{data_command}`" if data_command else "- Data: see the training data above.",
        f"- Command: `{metadata.training_command}`",
        ("- Intended use: research, a starting point for fine-tuning (`examples/train.py --stage finetune --model "
        f"{name}`). Not a medical device, not for clinical use. The data is synthetic or derived from one "
        "template image by random deformation: expect lower accuracy on real scans of other scanners, "
        "protocols and anatomy."),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished training run (its model folder)")
    parser.add_argument("name", help="the tag: <variant>.<tag>")
    parser.add_argument("--about", required=True, help="what the weights are, for the card")
    parser.add_argument("--test-data", type=Path, help="nnU-Net folder whose labelled test cases are scored")
    parser.add_argument("--notice", type=Path, help="the data's origins and licenses, copied as NOTICE")
    parser.add_argument("--data-command", default="", help="the command that made the training data, for the card")
    parser.add_argument("--time-log", type=Path, help="the run's log with GNU time's report, for the CPU hours")
    parser.add_argument("--hub-dir", type=Path, default=HUB_DIR, help="where the tag's folder goes (default: hub/)")
    parser.add_argument("--metric", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a further metric for the card, e.g. a fine-tuning result")  # fmt: skip
    args = parser.parse_args(argv)

    model = veloxseg.create_model(f"local-dir:{args.run_dir}", pretrained=True).eval()
    metadata = ModelMetadata.from_dict(model.pretrained_cfg["veloxseg"])
    run = json.loads((args.run_dir / "train_config.json").read_text())
    metrics = dict(metadata.metrics)
    if args.test_data:
        spec = read_dataset(args.test_data)
        if run["stage"] == "pretrain":  # no segmentation trained: its own objective on held-out scans
            test = score_reconstruction(model, spec, run["mask_ratio"], run["mask_patch"])
        else:
            test = score_test_cases(model, spec)
        metrics.update({name.replace("/", "_"): value for name, value in test.items()})
    metrics.update({name: float(value) for name, value in args.metric})
    metadata = dataclasses.replace(metadata, metrics=metrics)
    folder = args.hub_dir / args.name
    hours = cpu_hours(args.time_log) if args.time_log else None
    with atomic_folder(folder) as tmp:  # an older folder of the tag is replaced only by a complete one
        hub.save_pretrained(model, tmp, metadata=metadata, repo_id=f"{HUB_ORG}/{args.name}")
        if args.notice:
            shutil.copy(args.notice, tmp / hub.NOTICE_NAME)
        card = (tmp / hub.CARD_NAME).read_text()
        section = tag_section(args.name, run, metadata, args.about, hours, args.notice is not None, args.data_command)
        head, sep, rest = card.partition("\n## Usage")
        (tmp / hub.CARD_NAME).write_text(head + "\n" + section + sep + rest)
    print(f"wrote {folder}; test metrics: {json.dumps({k: round(v, 4) for k, v in metrics.items()})}")
    print(registry_entry(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
