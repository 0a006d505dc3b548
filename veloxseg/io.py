"""Atomic writes: a file or folder is written under a temporary name beside its target, then renamed
into place, so a reader (or a run resumed after a kill) never sees half of it.

    with atomic_file(path) as tmp:      # a temporary file ending in path's name (.nii.gz, .onnx kept)
        save(thing, tmp)
    with atomic_folder(folder) as tmp:  # a fresh temporary folder ".tmp-<name>" beside folder
        fill(tmp)
"""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp-"


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary file in ``path``'s folder (created if needed) to write; renamed to ``path`` when the
    block ends without an error, deleted when it raises. Its name ends in ``path``'s, suffixes included."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=f"-{path.name}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp's files are owner-only
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temporary_folder(folder: Path) -> Path:
    """Where :func:`atomic_folder` writes ``folder`` before renaming it."""
    return folder.with_name(TEMP_PREFIX + folder.name)


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """The empty folder :func:`temporary_folder` to fill (a leftover of an interrupted write is deleted
    first); renamed to ``folder``, replacing an older one, when the block ends without an error. When it
    raises, the temporary folder stays until the next write of ``folder``."""
    tmp = temporary_folder(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
