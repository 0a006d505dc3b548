"""Where ``veloxseg.optimize``'s batch-1 eval forward spends its oneDNN time (issue 34, eval at batch 1).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/experiments/speed/eval_onednn_breakdown.py 5

The reference model (the authors' weights) compiled for batch 1, warmed up, then ``forwards`` forwards with
oneDNN's verbose log on; every primitive execution is grouped by (kind, implementation, problem) and reported
as the median execution time times its calls per forward (medians: on a shared machine single executions are
sometimes preempted). The inductor kernels, MKL GEMMs and veloxseg's own kernels are not in this log: they
were read from ``perf record`` of the same loop (``eval_batch1.md``).
"""

import collections
import contextlib
import io
import os
import statistics
import sys

import torch

sys.path.insert(0, "benchmarks")
import speed  # noqa: E402
import veloxseg  # noqa: E402


def verbose_lines(forwards: int) -> list[str]:
    """oneDNN's verbose lines of ``forwards`` batch-1 forwards of the optimized reference model."""
    weights, config, x = speed.reference_run()
    optimized = veloxseg.optimize(veloxseg.load_reference(weights, config).eval(), batch_size=1)
    x = x[:1].contiguous()
    for _ in range(3):
        optimized(x)
    # oneDNN writes to the C stdout: send it to a file, then read it back.
    path = "/tmp/onednn_verbose.log"
    saved = os.dup(1)
    with open(path, "w") as log, contextlib.redirect_stdout(io.StringIO()):
        sys.stdout.flush()
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                for _ in range(forwards):
                    optimized(x)
        finally:
            os.dup2(saved, 1)
    with open(path) as log:
        return [line for line in log if line.startswith("onednn_verbose") and ",primitive,exec," in line]


def main() -> None:
    torch.set_num_threads(1)
    forwards = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    groups = collections.defaultdict(list)
    for line in verbose_lines(forwards):
        fields = line.rstrip().split(",")
        groups[(fields[5], fields[6].split(":")[0], fields[-2])].append(float(fields[-1]))
    rows = sorted(((statistics.median(v) * len(v) / forwards, len(v) // forwards, k) for k, v in groups.items()),
                  reverse=True)  # fmt: skip
    print(f"oneDNN total per forward (medians): {sum(r[0] for r in rows):.2f} ms\n")
    print("| ms per forward | calls | primitive | implementation | problem |\n| ---: | ---: | --- | --- | --- |")
    for total, calls, (kind, implementation, problem) in rows:
        print(f"| {total:.3f} | {calls} | {kind} | {implementation} | `{problem}` |")


if __name__ == "__main__":
    main()
