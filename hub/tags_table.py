"""Everything written about the published tags, made from each tag's metadata (its one source).

    python hub/tags_table.py            # print the tags table
    python hub/tags_table.py --check    # list what disagrees with the tags' metadata (exit 1 if anything)
    python hub/tags_table.py --write    # regenerate it all

A tag's facts are in its config.json (``pretrained_cfg["veloxseg"]``: data, metrics with their split
and case counts, license, notice, base model, and ``publication``: budget, CPU hours, machine,
command; hub/make_tag.py records them). Made from them: each tag's README.md (the card), NOTICE and
config.json ``description`` and 3-D fields (``veloxseg.hub.model_files``), the config.json SHA-256 in
``veloxseg.variants.PUBLISHED``, ``benchmarks/results/tags.md``, and the tags tables of MODEL_CARD.md
and (a short form) README.md, between their ``TABLE_START`` / ``TABLE_END`` markers. Tags in the order
of ``PUBLISHED``, so each variant's default tag comes first.
"""

import argparse
import json
import sys
from pathlib import Path

import veloxseg
from veloxseg import hub
from veloxseg.io import atomic_file
from veloxseg.metadata import ModelMetadata
from veloxseg.provenance import Publication, held_out
from veloxseg.variants import HUB_ORG, PUBLISHED

HUB_DIR = Path(__file__).resolve().parent
ROOT = HUB_DIR.parent
TAGS_MD = ROOT / "benchmarks" / "results" / "tags.md"
MODEL_CARD = ROOT / "MODEL_CARD.md"
README = ROOT / "README.md"
VARIANTS_PY = ROOT / "veloxseg" / "variants.py"
TABLE_START = "<!-- tags table: made by hub/tags_table.py --write from the tags' metadata; do not edit -->\n"
TABLE_END = "<!-- end of tags table -->\n"
TAGS_MD_HEAD = (
    "# Published tags\n\nMade by `bash hub/make_tags.sh data|train|tags` on a 2-core CPU machine, one torch thread per "
    "run, then `python hub/tags_table.py --write`. CPU hours: user + system time of the training process (GNU time). "
    "Held-out: test cases the run never saw (segmentation tags: the task's imagesTs; self-supervised tags: the Colin27 "
    "T1 test scans); validation metrics, from the cases that chose the checkpoint, are on each card only.\n\n"
)


def metadata_of(name: str, hub_dir: Path = HUB_DIR) -> ModelMetadata:
    """The metadata in tag ``name``'s config.json."""
    config = json.loads((hub_dir / name / hub.CONFIG_NAME).read_text(encoding="utf-8"))
    return ModelMetadata.from_dict(config["pretrained_cfg"]["veloxseg"])


def is_default(name: str) -> bool:
    """Whether tag ``name`` is its variant's default (its first in ``PUBLISHED``)."""
    return next(t for t in PUBLISHED if t.split(".")[0] == name.split(".")[0]) == name


def row(name: str, hub_dir: Path = HUB_DIR) -> str:
    """One tag's table row."""
    metadata = metadata_of(name, hub_dir)
    made = Publication(**metadata.publication)
    default = " (default)" if is_default(name) else ""
    hours = f"{made.cpu_hours:.2f}" if made.cpu_hours is not None else "not recorded"
    data = metadata.training_data.split(" (")[0]
    return (
        f"| `{name}`{default} | {data} | {made.budget} | {hours} | {held_out(metadata.metrics)} | "
        f"{metadata.evaluation_cases.get('test', '?')} | {metadata.license} |"
    )


def table(hub_dir: Path = HUB_DIR) -> str:
    """Every published tag, one row each."""
    lines = [
        "| tag | training data | budget | CPU hours | held-out (test split) | test cases | license |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(row(name, hub_dir) for name in PUBLISHED),
    ]
    return "\n".join(lines) + "\n"


def readme_table(hub_dir: Path = HUB_DIR) -> str:
    """The README's short form of :func:`table`: each tag, its training data and held-out numbers."""
    lines = ["| tag | trained on | held-out |", "| --- | --- | --- |"]
    for name in PUBLISHED:
        metadata = metadata_of(name, hub_dir)
        default = " (default)" if is_default(name) else ""
        lines.append(f"| `{name}`{default} | {metadata.training_data.split(' (')[0]} | {held_out(metadata.metrics)} |")
    return "\n".join(lines) + "\n"


def tag_files(name: str, hub_dir: Path = HUB_DIR) -> dict[str, str]:
    """Tag ``name``'s text files as its metadata makes them (README.md, NOTICE, config.json)."""
    model = veloxseg.create_model(f"local-dir:{hub_dir / name}", pretrained=False)  # the network; weights unchanged
    return hub.model_files(model, metadata_of(name, hub_dir), repo_id=f"{HUB_ORG}/{name}")


def expected_files(hub_dir: Path = HUB_DIR) -> dict[Path, str]:
    """Every generated file and the text it should hold (the registry's hashes aside)."""
    files = {hub_dir / name / filename: text for name in PUBLISHED for filename, text in tag_files(name, hub_dir).items()}
    text = table(hub_dir)
    files[TAGS_MD] = TAGS_MD_HEAD + text
    for page, text in ((MODEL_CARD, text), (README, readme_table(hub_dir))):
        head, _, rest = page.read_text(encoding="utf-8").partition(TABLE_START)
        files[page] = head + TABLE_START + text + TABLE_END + rest.partition(TABLE_END)[2]
    return files


def check(hub_dir: Path = HUB_DIR) -> list[str]:
    """What disagrees with the tags' metadata, one line each (empty: nothing)."""
    problems = [
        f"{path}: not what the tags' metadata makes (python hub/tags_table.py --write)"
        for path, text in expected_files(hub_dir).items()
        if not path.is_file() or path.read_text(encoding="utf-8") != text
    ]
    for name in PUBLISHED:
        for filename, expected in PUBLISHED[name]["sha256"].items():
            if hub.sha256_of(hub_dir / name / filename) != expected:
                problems.append(f"{name}/{filename}: its SHA-256 is not the one veloxseg.variants.PUBLISHED records")
    return problems


def write(hub_dir: Path = HUB_DIR) -> list[Path]:
    """Regenerate every file that disagrees with the metadata, and the config.json hashes in
    veloxseg/variants.py; returns the files written."""
    written = []
    for path, text in expected_files(hub_dir).items():
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        with atomic_file(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(path)
    source = VARIANTS_PY.read_text(encoding="utf-8")
    for name in PUBLISHED:  # each hash is unique, so it is replaced in place
        for filename, registered in PUBLISHED[name]["sha256"].items():
            source = source.replace(registered, hub.sha256_of(hub_dir / name / filename))
    if source != VARIANTS_PY.read_text(encoding="utf-8"):
        with atomic_file(VARIANTS_PY) as tmp:
            tmp.write_text(source, encoding="utf-8")
        written.append(VARIANTS_PY)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help="list what disagrees with the tags' metadata")
    action.add_argument("--write", action="store_true", help="regenerate cards, NOTICEs, configs, hashes and tables")
    args = parser.parse_args(argv)
    if args.write:
        for path in write():
            print(f"wrote {path}")
        return 0
    if args.check:
        problems = check()
        print("\n".join(problems) or "every tag file and table agrees with the tags' metadata")
        return 1 if problems else 0
    print(table(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
