"""Atomic writes and the overwrite rule of every command that writes.

A file or folder is written under a temporary name beside its target, then renamed into place, so a
reader (or a run resumed after a kill) never sees half of it:

    with atomic_file(path) as tmp:      # a temporary file ending in path's name (.nii.gz, .onnx kept)
        save(thing, tmp)
    with atomic_folder(folder) as tmp:  # a fresh temporary folder ".tmp-<name>" beside folder
        fill(tmp)

Before either, :func:`check_output` applies the one overwrite rule: an existing output is replaced
only with ``overwrite`` and only when it is an output of the same kind (recognised by its files);
never an input, the current folder or one of its parents.
"""

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"  # an older folder moved aside while the new one is renamed into place


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
    first); renamed to ``folder`` when the block ends without an error. When it raises, the temporary
    folder stays until the next write of ``folder``.

    An older ``folder`` is renamed aside (``.old-<name>``) before the new one is renamed in and deleted
    only after: at every moment one of them is complete on disk, and a write killed between the two
    renames is undone by the next write (the older folder is moved back first).
    """
    folder = Path(os.path.abspath(folder))
    tmp, old = temporary_folder(folder), folder.with_name(OLD_PREFIX + folder.name)
    if old.is_dir() and folder.exists():  # an earlier replacement was killed after the new folder made it
        shutil.rmtree(old)
    elif old.is_dir():  # ... or before: the older folder goes back
        os.rename(old, folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if folder.exists():
        os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except OSError:
            os.rename(old, folder)
            raise
        shutil.rmtree(old)
    else:
        os.rename(tmp, folder)


def check_output(
    path: Path,
    overwrite: bool,
    *,
    kind: str,
    is_kind: Callable[[Path], bool],
    inputs: Iterable[Path] = (),
) -> None:
    """Refuse to write ``path`` unless it is new, or an existing output of the same ``kind`` (``is_kind``
    recognises one by its files; "a MONAI bundle") with ``overwrite``; never the current folder or a parent of it, an
    input (``inputs``: files or folders), a folder holding an input or a file inside an input folder.

    Raises FileExistsError (exists, no ``overwrite``) or ValueError naming the path and why.
    """
    target = path.resolve()
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise ValueError(f"output {path} is the current folder or one of its parents; choose a new path")
    for source in inputs:
        source = source.resolve()
        if target == source or target in source.parents or (target.exists() and source in target.parents):
            raise ValueError(
                f"output {path} is one of the inputs or would replace one ({source}); choose another output path"
            )
    if not path.exists():
        return
    if not overwrite:
        raise FileExistsError(f"output {path} exists; pass --overwrite (overwrite=True) to replace it")
    if not is_kind(path):
        raise ValueError(
            f"output {path} exists and is not {kind}; --overwrite replaces only that, nothing else: "
            f"choose another output path"
        )
