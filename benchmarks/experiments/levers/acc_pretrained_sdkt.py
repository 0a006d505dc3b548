"""One-way SDKT from teachers pretrained within the same budget.

    python acc_pretrained_sdkt.py DATA SEED PRETRAIN_MIN TOTAL_MIN OUT
Phase 1: veloxseg_small_hr with teachers, L_rc only, PRETRAIN_MIN CPU minutes (its own warm-up and cosine).
Phase 2: the same model, L_seg + 0.5 L_rc + 2 L_sdkt with the teachers' Gram matrices detached (one-way),
TOTAL_MIN - PRETRAIN_MIN CPU minutes, then the benchmark's test scoring. With PHASE2=seg: phase 2 drops
the teachers and trains with L_seg alone (the pretrained weights as the only gain). Writes OUT.json.
"""

import functools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import accuracy  # noqa: E402

from veloxseg.losses import VeloxSegLoss  # noqa: E402

data, seed, pre, total, out = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), Path(sys.argv[5])
only_seg = os.environ.get("PHASE2") == "seg"
accuracy.SETUPS["pretrain"] = accuracy.Setup("veloxseg_small_hr", "default", "L_rc only", (0.0, 1.0, 0.0))
accuracy.SETUPS["phase2"] = accuracy.Setup(
    "veloxseg_small_hr", "default", f"{pre:g} CPU min of L_rc, then " + ("L_seg" if only_seg else "one-way SDKT"),
    (1.0, 0.0, 0.0) if only_seg else (1.0, 0.5, 2.0),
)
spec = accuracy.load_benchmark_data(data)
base = accuracy.base_config(data, None, None, cpu=True, seed=seed)
built = {}
build_network = accuracy.build_network


def same_network(name, spec, config, *cases):
    """The network of the first call, for both phases."""
    built.setdefault("model", build_network(name, spec, config, *cases))
    return built["model"]


accuracy.build_network = same_network
lr = accuracy.recorded_lr("veloxseg_small_hr")
rows = [accuracy.run("pretrain", spec, spec.training, spec.test, accuracy.setup_config("pretrain", base, lr), pre)]
built["model"].decoder.requires_grad_(True)  # build_model froze the student decoder for pretraining
if only_seg:
    built["model"].teachers = None
else:
    accuracy.VeloxSegLoss = functools.partial(VeloxSegLoss, one_way_sdkt=True)
phase2 = accuracy.setup_config("phase2", base, lr)
rows.append(accuracy.run("phase2", spec, spec.training, spec.test, phase2, total - pre))
out.with_name(out.name + ".json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
for r in rows:
    print(r["model"], r["seed"], r["steps"], round(r["step_s"], 3), round(r["train_cpu_min"], 2), round(r["dice_mean"], 4))
