"""What the examples/prepare_*.py scripts share: their command line and how they write a dataset folder.

Each script writes into a new or empty folder (or, with ``--overwrite``, over a dataset it wrote
before, recognised by its dataset.json's name), through a temporary folder renamed into place when
complete: see :func:`veloxseg.data.datasets.new_dataset_folder`.
"""

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

INSTALL_NILEARN = 'pip install "veloxseg[demo]" (or pip install nilearn)'


def dataset_parser(doc: str, counts: bool = True) -> argparse.ArgumentParser:
    """A parser with what every script takes: ``out_dir``, ``--seed``, ``--overwrite`` and, with
    ``counts``, ``--num-train``, ``--num-test`` and ``--resolution``; its description is ``doc``'s first paragraph."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    if counts:
        parser.add_argument("--num-train", type=int, default=8)
        parser.add_argument("--num-test", type=int, default=2)
        parser.add_argument("--resolution", type=int, default=3, help="voxel size in mm (default 3: 67 x 79 x 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset this script wrote before")
    return parser


def run(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    prepare: Callable[[argparse.Namespace], Path],
    missing_dependency: str,
) -> int:
    """Parse ``argv``, call ``prepare(args)`` and report on one line: what it wrote (exit 0), or why it
    wrote nothing (exit 2: ``missing_dependency`` on an ImportError, a refused folder, a missing file)."""
    args = parser.parse_args(argv)
    try:
        out = prepare(args)
    except ImportError:
        parser.error(missing_dependency)
    except (FileExistsError, FileNotFoundError) as err:
        parser.error(str(err))
    cases = len(list((out / "imagesTr").glob("*_0000.nii.gz")))
    print(f"wrote {cases} training cases to {out}")
    return 0
