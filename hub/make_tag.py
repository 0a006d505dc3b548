"""Turn a finished training run into the folder of a published tag, hub/<variant>.<tag>/.

    python hub/make_tag.py RUN_DIR veloxseg_small.mni152_tissue --test-data DIR --notice DIR/NOTICE.txt \\
        --time-log RUN.log --about "What the weights are for." --data-command "python examples/..."

Records everything about the tag in its metadata (config.json's ``pretrained_cfg["veloxseg"]``, the
tag's one source): the test-set metrics of ``--test-data`` beside the run's validation metrics (Dice
on whole imagesTs volumes, ``score_test_cases``, and for a model trained with modality dropout on each
subset of its modalities, ``score_modality_subsets``; for a ``pretrain`` run, the masked reconstruction
error on its scans, ``score_reconstruction``) with the number of cases of each split, the text of
``--notice``, and how the tag was made (:class:`veloxseg.provenance.Publication`: what it is, the
run's stage, recipe, seed, learning rate and budget, CPU hours and machine, the data's command).
Then writes the folder through ``save_pretrained``: config.json (with the description made from
those facts), model.safetensors, README.md (the card, with a section on this tag) and NOTICE; and
prints the SHA-256 entry for ``veloxseg.variants.PUBLISHED``. Check the folder with
``hub/publish.py``; ``hub/tags_table.py --write`` then regenerates the tables from every tag.
"""

import argparse
import dataclasses
import json
import os
import platform
import re
import sys
from pathlib import Path

from publish import registry_entry  # hub/publish.py, beside this script

import veloxseg
from veloxseg import hub
from veloxseg.data.datasets import read_dataset
from veloxseg.io import atomic_folder
from veloxseg.metadata import ModelMetadata
from veloxseg.provenance import Publication
from veloxseg.training.validate import score_modality_subsets, score_reconstruction, score_test_cases
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


def publication(run: dict, about: str, hours: float | None, data_command: str) -> Publication:
    """How the tag was made, from the run's train_config.json and this machine (where make_tag runs)."""
    roi = "x".join(map(str, run["roi"] or ["model ROI"]))
    threads = run.get("threads") or os.environ.get("OMP_NUM_THREADS", "default")  # hub/make_tags.sh sets both alike
    device, world_size = run.get("device", "cpu"), run.get("world_size", 1)
    accelerators = "no GPU" if device == "cpu" else f"{world_size} process(es) on {device}"
    return Publication(
        about=about, stage=run["stage"], recipe=run["recipe"], seed=run["seed"], lr=run["lr"],
        budget=f"{run['max_steps']} steps of {run['batch_size']} patches of {roi}", cpu_hours=hours,
        machine=f"{cpu_name()} ({threads} torch thread(s), {accelerators})", data_command=data_command,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished training run (its model folder)")
    parser.add_argument("name", help="the tag: <variant>.<tag>")
    parser.add_argument("--about", required=True, help="what the weights are, for the card")
    parser.add_argument("--test-data", type=Path, help="nnU-Net folder whose labelled test cases are scored")
    parser.add_argument("--license", help="the tag's license (a Hub license id); default: the run's")
    parser.add_argument("--notice", type=Path, help="the data's origins and licenses: kept in the metadata, written as NOTICE")
    parser.add_argument("--data-command", default="", help="the command that made the training data, for the card")
    parser.add_argument("--time-log", type=Path, help="the run's log with GNU time's report, for the CPU hours")
    parser.add_argument("--hub-dir", type=Path, default=HUB_DIR, help="where the tag's folder goes (default: hub/)")
    parser.add_argument("--metric", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a further metric, on other data: named <dataset>_<metric>, e.g. colin27_dice_3mm")  # fmt: skip
    args = parser.parse_args(argv)

    model = veloxseg.create_model(f"local-dir:{args.run_dir}", pretrained=True).eval()
    metadata = ModelMetadata.from_dict(model.pretrained_cfg["veloxseg"])
    run = json.loads((args.run_dir / "train_config.json").read_text())
    metrics, cases = dict(metadata.metrics), dict(metadata.evaluation_cases)
    if args.test_data:
        spec = read_dataset(args.test_data)
        if run["stage"] == "pretrain":  # no segmentation trained: its own objective on held-out scans
            test = score_reconstruction(model, spec, run["mask_ratio"], run["mask_patch"])
            cases["test"] = len(spec.test or spec.training)
        else:
            test = score_test_cases(model, spec)
            if metadata.modality_dropout:  # trained for any subset of its modalities: each one's Dice
                test.update(score_modality_subsets(model, spec))
            cases["test"] = len(spec.test)
        metrics.update({name.replace("/", "_"): value for name, value in test.items()})
    metrics.update({name: float(value) for name, value in args.metric})
    hours = cpu_hours(args.time_log) if args.time_log else None
    metadata = dataclasses.replace(
        metadata, metrics=metrics, evaluation_cases=cases, license=args.license or metadata.license,
        notice=args.notice.read_text(encoding="utf-8") if args.notice else metadata.notice,
        publication=dataclasses.asdict(publication(run, args.about, hours, args.data_command)),
    )  # fmt: skip
    folder = args.hub_dir / args.name
    with atomic_folder(folder) as tmp:  # an older folder of the tag is replaced only by a complete one
        hub.save_pretrained(model, tmp, metadata=metadata, repo_id=f"{HUB_ORG}/{args.name}")
    print(f"wrote {folder}; test metrics: {json.dumps({k: round(v, 4) for k, v in metrics.items()})}")
    print(registry_entry(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
