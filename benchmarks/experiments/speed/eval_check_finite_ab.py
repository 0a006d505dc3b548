"""Same-process A/B of the input check in ``veloxseg.optimize``'s batch-1 forward (issue 34, eval at batch 1).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/experiments/speed/eval_check_finite_ab.py 15

The reference model compiled for batch 1, its forward timed (process CPU time, interleaved rounds) with
``check_finite`` as it is (one sum) and as it was before (``torch.isfinite(x).all()``).
"""

import statistics
import sys
import types

import torch

sys.path.insert(0, "benchmarks")
import speed  # noqa: E402
import veloxseg  # noqa: E402


def isfinite_all_check(self: veloxseg.VeloxSeg, x: torch.Tensor, groups: object = None) -> None:
    """The check before: one ``isfinite`` pass and ``all`` (only finite inputs are timed here)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError("non-finite input")


def main() -> None:
    torch.set_num_threads(1)
    weights, config, x = speed.reference_run()
    x = x[:1].contiguous()
    optimized = veloxseg.optimize(veloxseg.load_reference(weights, config).eval(), batch_size=1)

    def before() -> None:  # the same compiled copy, its model's check patched for one call
        optimized.model.check_finite = types.MethodType(isfinite_all_check, optimized.model)
        try:
            optimized(x)
        finally:
            del optimized.model.check_finite

    runs = {"sum check (now)": lambda: optimized(x), "isfinite(x).all() (before)": before}
    times = speed.interleaved_cpu_times(runs, int(sys.argv[1]))
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.1f} | {min(values) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
