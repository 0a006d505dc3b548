"""The training process's memory allocator: keep freed memory instead of returning it to the system.

A training step frees and re-allocates the same few hundred MB of activations every step. glibc's
malloc serves blocks from 128 KB up (its threshold grows with use, up to 32 MB) with fresh ``mmap``
pages and trims the heap's free top back to the system, so every step page-faults its activations in
again: 10-16 k faults a step for ``veloxseg_small_hr`` and UNet at 2 x 64^3 (``benchmarks/results/train_speed.md``),
a few microseconds each in a VM. Raising the mmap and trim thresholds (what ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` do, or jemalloc/tcmalloc as Intel recommends for PyTorch on CPUs) keeps the
pages mapped: 0-1 faults a step. The process's resident memory stays at its peak instead of falling
between steps.

Set from inside the process with ``mallopt`` (there is no Python API for it), so the trainer
(:func:`veloxseg.training.train`) and every benchmark that trains get it without environment variables;
a no-op where the C library is not glibc (macOS, Windows, musl).
"""

import ctypes
import ctypes.util
import functools

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: blocks above it are still mmapped (and returned when freed)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never trim below 2 GiB of free heap top
TOP_PAD = 64 * 2**20  # grow the heap 64 MiB at a time


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (see the module docstring); True when it took
    effect, False where the C library is not glibc. Called once per process; later calls return the first result."""
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name)
        libc.gnu_get_libc_version  # only glibc has it  # noqa: B018
    except (OSError, AttributeError, TypeError):
        return False
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
