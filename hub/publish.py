"""Check a model folder and publish it to the Hugging Face Hub (a dry run unless --push).

    python hub/publish.py hub/<name> --repo-id <org>/<name>           # check only
    python hub/publish.py hub/<name> --repo-id <org>/<name> --push    # check, then upload

Checks: config.json, model.safetensors and README.md are there; the folder loads through
``local-dir:`` with every tensor used as saved; an eval forward on random input of the ROI size
gives finite logits of the right shape; README.md has the Hub front matter (license, tags,
library_name, datasets, metrics) and mentions the training command, the training data and each
metric; for a folder named after a published tag (veloxseg.variants.PUBLISHED), that each file has the
SHA-256 recorded there (the registry refuses any other), and that a NOTICE the card points to is
there. ``--hashes`` prints the folder's entry for that table. With --push the files are
uploaded (veloxseg.hub.push_folder).
"""

import argparse
import sys
from pathlib import Path

import torch
from huggingface_hub import ModelCard

import veloxseg
from veloxseg import hub
from veloxseg.metadata import ModelMetadata
from veloxseg.variants import PUBLISHED

FRONT_MATTER = ("license", "tags", "library_name", "pipeline_tag", "datasets", "metrics")


def validate(folder: Path) -> list[str]:
    """What keeps ``folder`` from being published; empty when nothing does."""
    missing = [name for name in hub.REPO_FILES if not (folder / name).is_file()]
    if missing:
        return [f"missing {name}" for name in missing]
    try:
        model = veloxseg.create_model(f"local-dir:{folder}", pretrained=False)
        report = hub.load_pretrained(model)
    except (ValueError, FileNotFoundError) as err:
        return [f"does not load: {err}"]
    problems = [] if report.exact else [f"the weights do not load as saved:\n{report}"]
    cfg = model.config
    with torch.no_grad():
        logits = model.eval()(torch.randn(1, cfg.in_channels, *cfg.roi_size))
    if logits.shape != (1, cfg.n_classes, *cfg.roi_size) or not torch.isfinite(logits).all():
        shape = tuple(logits.shape)
        problems.append(f"a forward on random {list(cfg.roi_size)} input gives {shape} or non-finite logits")

    metadata = ModelMetadata.from_dict(model.pretrained_cfg["veloxseg"])
    card = ModelCard.load(folder / hub.CARD_NAME)
    front = card.data.to_dict()
    problems += [f"README.md front matter has no {key!r}" for key in FRONT_MATTER if not front.get(key)]
    results = {r.metric_name or r.metric_type: r.metric_value for r in card.data.eval_results or []}
    if results != metadata.metrics:
        problems.append(f"README.md model-index results {results} are not config.json's metrics {metadata.metrics}")
    if front.get("license") != metadata.license:
        problems.append(f"README.md license {front.get('license')!r} is not config.json's {metadata.license!r}")
    mentions = {
        "training command": metadata.training_command,
        "training data": metadata.training_data,
        **{f"metric {name!r}": name for name in metadata.metrics},
    }
    for what, text in mentions.items():
        if not text:
            problems.append(f"config.json records no {what}")
        elif text not in card.text:
            problems.append(f"README.md does not mention the {what}")
    if "NOTICE" in card.text and not (folder / hub.NOTICE_NAME).is_file():
        problems.append(f"README.md points to a {hub.NOTICE_NAME} that the folder does not have")
    registered = PUBLISHED.get(folder.name, {}).get("sha256", {})
    for name, expected in registered.items():
        if hub.sha256_of(folder / name) != expected:
            problems.append(f"{name}: its SHA-256 is not the one veloxseg.variants.PUBLISHED records for {folder.name}")
    return problems


def registry_entry(folder: Path) -> str:
    """The folder's entry for veloxseg.variants.PUBLISHED: its files' SHA-256 (the rest is in its config.json)."""
    lines = [f'            "{n}": "{hub.sha256_of(folder / n)}",' for n in (hub.CONFIG_NAME, hub.WEIGHTS_NAME)]
    return "\n".join([f'    "{folder.name}": dict(', "        sha256={", *lines, "        },", "    ),"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="model folder: config.json, model.safetensors, README.md")
    parser.add_argument("--repo-id", required=True, help="Hub repo to publish to, org/name")
    parser.add_argument("--push", action="store_true", help="upload after the checks (default: dry run)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="branch to upload to (default: main)")
    parser.add_argument("--hashes", action="store_true", help="print the folder's entry for the registry")
    args = parser.parse_args(argv)
    if args.hashes:
        print(registry_entry(args.folder))

    problems = validate(args.folder)
    if problems:
        print(f"{args.folder}: not publishable:")
        print("\n".join(f"  - {p}" for p in problems))
        return 1
    if not args.push:
        print(f"{args.folder}: ready; dry run, nothing uploaded (add --push to upload to {args.repo_id})")
        return 0
    commit = hub.push_folder(
        args.folder, args.repo_id, private=args.private or None, revision=args.revision,
        commit_message=f"Publish {args.folder.name}",
    )  # fmt: skip
    print(f"{args.folder}: uploaded to {args.repo_id} ({commit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
