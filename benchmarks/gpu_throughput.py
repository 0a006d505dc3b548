"""GPU inference throughput of the VeloxSeg variants: patches/s at the largest batch that fits.

    python benchmarks/gpu_throughput.py [--variants veloxseg_small] [--dtypes bf16 fp32] [--max-batch 512]

For each variant and dtype the batch doubles from 1 until memory runs out (or --max-batch); each
batch that fits is timed over --iters eval forwards of (B, 2, 96, 96, 96) after warm-up, with CUDA
events. Writes benchmarks/results/gpu_throughput.{md,json} with the card's name. The paper reports
599 patches/s for veloxseg_small on an RTX 3090 in fp16.
"""

import argparse
import json
from pathlib import Path

import torch

import veloxseg

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def patches_per_second(model: torch.nn.Module, batch: int, dtype: torch.dtype, iters: int) -> float:
    x = torch.randn(batch, 2, 96, 96, 96, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        for _ in range(3):
            model(x)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            model(x)
        end.record()
        torch.cuda.synchronize()
    return batch * iters / (start.elapsed_time(end) / 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["veloxseg_tiny", "veloxseg_small", "veloxseg_base"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_throughput")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name()
    rows = []
    for name in args.variants:
        model = veloxseg.create_model(name).cuda().eval()
        for dtype in args.dtypes:
            best, batch = None, 1
            while batch <= args.max_batch:
                try:
                    rate = patches_per_second(model, batch, DTYPES[dtype], args.iters)
                except torch.OutOfMemoryError:
                    break
                finally:
                    torch.cuda.empty_cache()
                peak = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
                print(f"{name} {dtype} batch {batch}: {rate:.0f} patches/s, peak {peak:.1f} GiB", flush=True)
                if best is None or rate > best["patches_per_s"]:
                    best = {"model": name, "dtype": dtype, "batch": batch, "patches_per_s": rate, "peak_gib": peak}
                batch *= 2
            rows.append(best)
    lines = ["| model | dtype | best batch | patches/s | peak GiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['patches_per_s']:.0f} | {r['peak_gib']:.1f} |" for r in rows]
    table = "\n".join(lines)
    print(f"\n{card}, torch {torch.__version__}\n{table}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(f"# GPU inference throughput, 2 x 96^3 patches\n\nCard: {card}, torch {torch.__version__}.\n\n{table}\n")
    args.out.with_suffix(".json").write_text(json.dumps({"card": card, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
