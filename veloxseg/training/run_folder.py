"""The run folder (``output_dir``): where a run may write, one writer at a time, what ``--resume`` continues.

* :func:`check_run_paths`: before anything is read or written, the output folder is a folder (or can
  be made one), is neither the data nor the model a run starts from, and a new run's folder is new or
  empty; ``--resume`` finds a run there to continue.
* :func:`check_resume`: a resumed run keeps every setting that shapes it (data, model, recipe,
  schedule); only how it is watched (logging, validation, checkpoints, workers) may change.
* :func:`run_lock`: ``OUTPUT_DIR/run.lock`` (the holder's pid and host) keeps a second run out while
  one writes; a lock left by a crashed run on this host (its pid gone) is taken over.
"""

import dataclasses
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import TrainConfig

LOCK_NAME = "run.lock"
TRAIN_CONFIG = "train_config.json"
CACHE_FOLDER = "data"  # OUTPUT_DIR/data: the demo or converted data, the only thing a new run may find there
# Settings a resumed run may change: how the run is watched and run, not what it trains.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "resume", "val_every", "checkpoint_every", "keep_checkpoints", "log_every", "sw_batch_size",
    "sw_overlap", "progress", "cpu", "threads", "num_workers", "cache", "cache_dir", "max_nonfinite_steps", "command",
})  # fmt: skip


def check_run_paths(config: TrainConfig) -> None:
    """Raise ValueError (FileExistsError / FileNotFoundError for a run that is there / missing) naming the
    path when ``config.output_dir`` cannot hold this run; reads folder listings only."""
    output_dir = Path(config.output_dir)
    blocking = next((p for p in (output_dir, *output_dir.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ValueError(f"output_dir {output_dir}: {blocking} is a file, not a folder")
    if config.data is not None and not Path(config.data).is_dir():
        what = "is a file" if Path(config.data).exists() else "does not exist"
        raise ValueError(f"data {config.data} {what}: give the dataset's folder (nnU-Net raw or MSD)")
    sources = {"data": config.data}
    if config.model.startswith("local-dir:"):
        sources["model"] = config.model.removeprefix("local-dir:")
    for flag, source in sources.items():
        if source is not None and output_dir.resolve() == Path(source).expanduser().resolve():
            raise ValueError(
                f"output_dir {output_dir} is the {flag} folder: a run writes config.json, README.md and more into "
                f"its output_dir; choose another output_dir"
            )
    found = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if config.resume:
        if not (output_dir / TRAIN_CONFIG).is_file():
            raise FileNotFoundError(
                f"resume: {output_dir} holds no run to continue (no {TRAIN_CONFIG}); start without resume"
            )
    elif "checkpoints" in found or "config.json" in found:
        raise FileExistsError(
            f"{output_dir} holds an earlier run: pass resume to continue it, or use another output_dir"
        )
    elif set(found) - {CACHE_FOLDER}:
        listed = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise FileExistsError(
            f"output_dir {output_dir} already holds files ({listed}); a new run needs a new or empty folder: "
            f"choose another output_dir"
        )


def check_resume(config: TrainConfig, output_dir: Path) -> None:
    """Raise ValueError naming every flag of ``config`` (resolved) that differs from the run saved in
    ``output_dir/train_config.json`` and changes what it trains."""
    saved = json.loads((output_dir / TRAIN_CONFIG).read_text())
    new = json.loads(json.dumps(dataclasses.asdict(config)))  # as saved: tuples become lists
    changed = [
        f"--{name.replace('_', '-')} {_shown(saved.get(name))} -> {_shown(value)}"
        for name, value in new.items()
        if name not in RESUMABLE_CHANGES and _normalised(name, saved.get(name)) != _normalised(name, value)
    ]
    if changed:
        raise ValueError(
            f"resume: these settings differ from the run in {output_dir} ({TRAIN_CONFIG}) and would change what it "
            f"trains: {'; '.join(changed)}. Resume with the run's settings, or start a new run in another output_dir"
        )


@contextmanager
def run_lock(output_dir: Path, main_process: bool = True) -> Iterator[None]:
    """Hold ``output_dir/run.lock`` (creating ``output_dir``) for the block; the main process locks.

    Raises FileExistsError naming the holder when another live process (or another host) holds it.
    """
    if not main_process:
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = output_dir / LOCK_NAME
    mine = {"pid": os.getpid(), "host": socket.gethostname()}
    while not _create_exclusively(lock, mine):
        holder = _read_lock(lock)
        if holder is not None and not _is_stale(holder):
            raise FileExistsError(
                f"{output_dir} is in use by another run (pid {holder['pid']} on {holder['host']}, {lock}); wait for "
                f"it to end or choose another output_dir (delete {lock} only if that run is gone)"
            )
        lock.unlink(missing_ok=True)  # a crashed run's lock (or an unreadable one): taken over
    try:
        yield
    finally:
        if _read_lock(lock) == mine:
            lock.unlink(missing_ok=True)


def _create_exclusively(lock: Path, holder: dict[str, Any]) -> bool:
    """Write ``lock`` complete or not at all: a temporary file hard-linked to its name (which fails
    when the name exists), so no other run ever reads a half-written lock."""
    tmp = lock.with_name(f".{LOCK_NAME}.{holder['pid']}")
    tmp.write_text(json.dumps(holder))
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _read_lock(lock: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and {"pid", "host"} <= holder.keys() else None


def _is_stale(holder: dict[str, Any]) -> bool:
    """Whether the lock's holder is gone: a process of this host that no longer runs (another host's
    processes cannot be seen: their locks are never stale)."""
    if holder["host"] != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _normalised(name: str, value: Any) -> Any:
    return os.path.normpath(value) if name in ("data", "hf_dataset") and isinstance(value, str) else value


def _shown(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value
