"""CPU speed of VeloxSeg and MONAI's networks: eval latency, training step, FLOPs, parameters, memory.

    python benchmarks/speed.py                       # full table, saved under benchmarks/results/
    python benchmarks/speed.py --models veloxseg_small --threads 1 --repeats 20

Every (model, threads) cell runs in a fresh subprocess, so thread pools and peak memory do not leak
between rows. Latency is wall time of one eval forward of a (1, 2, 96, 96, 96) patch; "train" is one
forward + backward in training mode with teachers and deep supervision (VeloxSeg only). With
``--baseline-commit acdbd44`` a ``veloxseg_small@<commit>`` row runs the package as it was at that commit
(acdbd44: the first faithful network, a straightforward implementation) in the same run, for the ratio
that matters. ``veloxseg_small+optimize`` is ``veloxseg.optimize(veloxseg_small)``, compiled in its worker.
Ratios are to veloxseg_small in the same run; absolute numbers depend on the machine and its load.

    python benchmarks/speed.py --authors-ab acdbd44 --batches 1 2 --rounds 15 --out benchmarks/results/eval-batch1

``--authors-ab COMMIT`` is issue 34's eval check instead: in this one process, the package at COMMIT (acdbd44:
the first faithful network, bit-exact to the authors' code) loaded as a second package, this tree's eager
model and ``veloxseg.optimize`` copies compiled for each of ``--batches``, all three with the authors'
weights (``../shared/reference``), their outputs checked against the authors' (relative error per sample
under 1e-5), then forwards interleaved round by round, process CPU time, at the current thread count.
"""

import argparse
import functools
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VELOXSEG = ["veloxseg_tiny", "veloxseg_small", "veloxseg_base", "veloxseg_small_hr"]
OPTIMIZED = "veloxseg_small+optimize"  # veloxseg.optimize(veloxseg_small): compiled once per worker
MONAI = ["SegResNet", "UNet", "UNETR", "DynUNet", "MedNeXt-S", "SwinUNETR"]
REFERENCE = ROOT.parent / "shared" / "reference" / "reference_autopetii.safetensors"


def build(name: str) -> torch.nn.Module:
    if name.endswith("+optimize"):
        import veloxseg

        return veloxseg.optimize(build(name.removesuffix("+optimize")))
    if "@" in name:  # an older checkout: its default config is veloxseg_small
        from veloxseg.model import VeloxSeg

        return VeloxSeg()
    if name.startswith("veloxseg"):
        import veloxseg

        return veloxseg.create_model(name)
    sys.path.insert(0, str(HERE))
    from baselines import build as build_baseline

    return build_baseline(name, 2, 2, (96, 96, 96))


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS count (VmHWM) from the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def worker(job: dict) -> dict:
    """Runs in the subprocess: time one model at one thread count."""
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build(job["model"])
    x = torch.randn(1, 2, 96, 96, 96)
    result = {"module": sys.modules[type(model).__module__].__file__, "build_s": time.perf_counter() - start}
    model.eval()
    with torch.inference_mode():
        # From before the first forward, and not counting the model's build (or compilation): the
        # peak RSS of the forwards over the RSS of the built model.
        rss_before = current_rss_mb()
        reset_peak_rss()
        model(x)
        times = []
        for _ in range(job["repeats"]):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    result["peak_mem_mb"] = peak_rss_mb() - rss_before
    result["eval_ms"] = [t * 1000 for t in times]
    if job["train"]:
        model.train()
        train_times = []
        for _ in range(max(2, job["repeats"] // 3) + 1):
            start = time.perf_counter()
            out = model(x)
            loss = sum(t.float().mean() for t in out.logits) + out.reconstruction.mean()
            loss = loss + sum((out.gram - g).square().mean() for g in out.teacher_grams)
            loss.backward()
            model.zero_grad(set_to_none=True)
            train_times.append(time.perf_counter() - start)
        result["train_ms"] = [t * 1000 for t in train_times[1:]]  # first step warms up
    return result


def count(name: str) -> tuple[int, float]:
    """(parameters used at inference, GFLOP of one eval forward) via torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(name.removesuffix("+optimize")).eval()
    params = model.inference_parameters() if hasattr(model, "inference_parameters") else sum(
        p.numel() for p in model.parameters()
    )  # fmt: skip
    # The network's arithmetic: width-folded JLC convs also multiply structural zeros (small: 3.73 GFLOP).
    from veloxseg.layers import JLCBlock

    for module in model.modules():
        if isinstance(module, JLCBlock):
            module.narrow_groups = False
    # oneDNN's conv op is not in FlopCounterMode's table: count on the plain aten path.
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 2, 96, 96, 96))
    return params, counter.get_total_flops() / 1e9


def checkout(commit: str, into: Path) -> str:
    """Extract ``veloxseg/`` at ``commit`` into ``into``; returns the full SHA."""
    sha = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, capture_output=True, text=True, check=True)
    sha = sha.stdout.strip()
    archive = subprocess.run(["git", "archive", sha, "veloxseg"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return sha


def run_job(job: dict, pythonpath: Path | None = None, script: str = __file__) -> dict:
    """``job`` run by ``script --worker JOB`` in a fresh process at ``job["threads"]`` threads; its last stdout
    line (JSON). Other benchmarks pass their own ``script`` for the same isolation."""
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]))
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(job)], capture_output=True, text=True, env=env
    )
    if proc.returncode:
        raise RuntimeError(f"{job['model']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def answered_job(args: argparse.Namespace, worker: Callable[[dict], dict]) -> bool:
    """The worker side of :func:`run_job`: when the script was started with ``--worker JOB`` (a parser
    argument every script that :func:`run_job` runs declares), print ``worker(JOB)`` as the JSON line
    :func:`run_job` reads and return True; else False."""
    if not args.worker:
        return False
    print(json.dumps(worker(json.loads(args.worker))))
    return True


def authors_package(commit: str, into: Path) -> types.ModuleType:
    """``veloxseg/`` at ``commit`` imported as the package ``veloxseg_at_<sha>`` (its imports are relative),
    beside this tree's ``veloxseg`` in the same process; returns its ``convert`` module."""
    sha = checkout(commit, into)
    package = types.ModuleType(f"veloxseg_at_{sha[:8]}")
    package.__path__ = [str(into / "veloxseg")]
    sys.modules[package.__name__] = package
    return importlib.import_module(f"{package.__name__}.convert")


def reference_run() -> tuple[dict[str, torch.Tensor], str, torch.Tensor]:
    """The authors' state dict, config (JSON) and (2, 2, 96, 96, 96) input from the reference vectors."""
    from safetensors import safe_open

    with safe_open(REFERENCE, "pt") as f:
        tensors, config = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()["config"]
    weights = {k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")}
    return weights, config, tensors["input"]


def relative_errors(ours: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Per sample ||ours - ref|| / ||ref||."""
    return [(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item() for a, b in zip(ours, ref)]


def ab_models(commit: str, into: Path, batches: list[int]) -> tuple[dict[str, Callable], float]:
    """(the forwards to time, named "<implementation> b<batch>", and the largest relative error to the
    authors' outputs); raises AssertionError when one is 1e-5 or more."""
    import veloxseg

    weights, config, x = reference_run()
    authors = authors_package(commit, into).load_reference(weights, config).eval()
    eager = veloxseg.load_reference(weights, config).eval()
    runs, worst = {}, 0.0
    for batch in batches:
        inputs = x[torch.arange(batch) % 2].contiguous()  # sample 1 is the reference's small-amplitude one
        models = {"authors": authors, "eager": eager, "optimize": veloxseg.optimize(eager, batch_size=batch)}
        with torch.inference_mode():
            expected = authors(inputs)
            for name, model in models.items():
                worst = max(worst, *relative_errors(model(inputs), expected))
                runs[f"{name} b{batch}"] = functools.partial(model, inputs)
    assert worst < 1e-5, f"outputs differ from the authors' by {worst:.2e}"
    return runs, worst


def interleaved_cpu_times(runs: dict[str, Callable], rounds: int) -> dict[str, list[float]]:
    """Process CPU seconds of every run, one call each per round, runs in turn (after one untimed round)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for round_ in range(rounds + 1):
            for name, run in runs.items():
                start = time.process_time()
                run()
                if round_:
                    times[name].append(time.process_time() - start)
    return times


def authors_ab(args: argparse.Namespace) -> None:
    """``--authors-ab``: the ratio of this tree's eval forward to the authors' code at each batch size."""
    with tempfile.TemporaryDirectory() as tmp:
        runs, worst = ab_models(args.authors_ab, Path(tmp), args.batches)
        times = interleaved_cpu_times(runs, args.rounds)
    lines = ["| batch | implementation | median CPU ms | min | ratio to the authors' (medians) | (mins) |",
             "| ---: | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, values in times.items():
        implementation, batch = name.split(" b")
        authors = times[f"authors b{batch}"]
        lines.append(
            f"| {batch} | {implementation} | {statistics.median(values) * 1e3:.1f} | {min(values) * 1e3:.1f} "
            f"| {statistics.median(values) / statistics.median(authors):.3f} | {min(values) / min(authors):.3f} |"
        )
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {os.cpu_count()} cores"
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    text = (f"Machine: {machine}, {torch.get_num_threads()} thread(s), {args.rounds} interleaved rounds. "
            f"Command: `{command}`\n\nLargest relative error to the authors' outputs: {worst:.1e}\n\n"
            + "\n".join(lines) + "\n")  # fmt: skip
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(f"# Eval against the authors' code, one process\n\n{text}")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=VELOXSEG + [OPTIMIZED] + MONAI)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per cell (3 for models over 1 s)")
    parser.add_argument("--baseline-commit", default=None, help="commit of the straightforward implementation")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/speed (for --authors-ab: no file)")
    parser.add_argument("--authors-ab", metavar="COMMIT", help="eval A/B against the package at COMMIT (see above)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2], help="batch sizes of --authors-ab")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds of --authors-ab")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if answered_job(args, worker):
        return
    if args.authors_ab:
        authors_ab(args)
        return
    args.out = args.out or HERE / "results" / "speed"

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = [(m, None) for m in args.models]
        if args.baseline_commit:
            sha = checkout(args.baseline_commit, Path(tmp))
            models.insert(0, (f"veloxseg_small@{sha[:8]}", Path(tmp)))
        for name, path in models:
            params, gflop = count(name) if path is None else (None, None)
            row = {"model": name, "params": params, "gflop": gflop}
            for threads in args.threads:
                repeats = args.repeats if name.startswith("veloxseg") or name in ("UNet", "SegResNet") else 3
                train = name.startswith("veloxseg") and not name.endswith("+optimize")
                job = {"model": name, "threads": threads, "repeats": repeats, "train": train}
                row[threads] = run_job(job, path)
                print(name, threads, "thread(s):", spread(row[threads]["eval_ms"]), "ms", flush=True)
            rows.append(row)

    small = next(r for r in rows if r["model"] == "veloxseg_small")
    header = ["model", "params (M)", "GFLOP"]
    for t in args.threads:
        header += [f"eval ms, {t} thr (min-max)", f"ratio {t} thr", f"train step ms, {t} thr"]
    header.append("peak mem MB (1st thr)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        name = row["model"]
        if name.endswith("+optimize"):
            name += f" (compiled in {row[args.threads[0]]['build_s']:.0f} s)"
        cells = [name, f"{row['params'] / 1e6:.2f}" if row["params"] else "-",
                 f"{row['gflop']:.2f}" if row["gflop"] else "-"]  # fmt: skip
        for t in args.threads:
            ratio = statistics.median(row[t]["eval_ms"]) / statistics.median(small[t]["eval_ms"])
            train = spread(row[t]["train_ms"]) if "train_ms" in row[t] else "-"
            cells += [spread(row[t]["eval_ms"]), f"{ratio:.2f}", train]
        cells.append(f"{row[args.threads[0]]['peak_mem_mb']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {os.cpu_count()} cores"
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    args.out.with_suffix(".md").write_text(
        f"# CPU speed, batch 1, 2 x 96^3\n\nMachine: {machine}. Command: `{command}`\n\n{table}\n"
    )
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "command": command, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
