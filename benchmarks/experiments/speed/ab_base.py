"""Same-process A/B of the training step: this tree's layers against commit 6547912's, and MONAI UNet.

    git archive 6547912 | tar -x -C /tmp/speed/base
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/experiments/speed/ab_base.py 10 /tmp/speed/base

Two ``veloxseg_small_hr`` default-recipe steps (``benchmarks/step_ratio.py``'s setup): one as this tree
builds it, one with 6547912's grouped-conv weight gradient (JLC), PWA gather/scatter and detail-path conv
(the old functions loaded from the extracted tree and patched onto that model), and UNet, interleaved
(``rounds`` rounds of 2 steps each), process CPU time, one thread.
"""
import importlib.util, sys, types, statistics, torch
sys.path.insert(0, "benchmarks")
BASE = sys.argv[2]
import step_ratio as sr
import veloxseg.layers.jlc as jlc
from veloxseg.layers.pwa import PairedWindowAttention
from veloxseg.training.allocator import keep_freed_memory
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path); mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod; spec.loader.exec_module(mod); return mod
base_conv = load("veloxseg.layers.conv_base", f"{BASE}/veloxseg/layers/conv.py")
base_pwa = load("veloxseg.layers.pwa_base", f"{BASE}/veloxseg/layers/pwa.py")
torch.set_num_threads(1); keep_freed_memory()
branch = sr.build_setup("veloxseg_small_hr")
base = sr.build_setup("veloxseg_small_hr")
unet = sr.build_setup("UNet")
m = [c.cell_contents  # the model in the step closure
     for c in base.step.__closure__ if isinstance(c.cell_contents, torch.nn.Module) and hasattr(c.cell_contents, "decoder")][0]
m.decoder.detail.spatial.channels_last_input = False
for mod in m.modules():
    if isinstance(mod, PairedWindowAttention):
        mod._gather = types.MethodType(base_pwa.PairedWindowAttention._gather, mod)
        mod._scatter = types.MethodType(base_pwa.PairedWindowAttention._scatter, mod)
new_gc = jlc.grouped_conv3d
def base_step():
    jlc.grouped_conv3d = base_conv.grouped_conv3d
    try: base.step()
    finally: jlc.grouped_conv3d = new_gc
setups = [sr.StepSetup("branch", branch.step), sr.StepSetup("base-6547912", base_step), sr.StepSetup("UNet", unet.step)]
times = sr.interleaved_step_times(setups, int(sys.argv[1]), 2)
ref = statistics.median(times["UNet"])
print("| network | median CPU s / step | min | ratio to UNet (medians) |\n| --- | ---: | ---: | ---: |")
for k, v in times.items():
    print(f"| {k} | {statistics.median(v):.4f} | {min(v):.4f} | {statistics.median(v) / ref:.3f} |")
print("branch / base (medians):", round(statistics.median(times["branch"]) / statistics.median(times["base-6547912"]), 3))
