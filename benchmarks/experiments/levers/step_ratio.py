"""CPU time per training step, data loading included, of two accuracy-benchmark setups interleaved in
one process (5 steps of one, then 5 of the other, ROUNDS times; the first round is not counted).
The ratio of the means gives the step counts at which both get the same CPU time.

    python step_ratio.py DATA SETUP_A SETUP_B ROUNDS
"""

import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import accuracy  # noqa: E402

from veloxseg.losses import VeloxSegLoss  # noqa: E402
from veloxseg.training import (  # noqa: E402
    batches,
    build_datasets,
    build_loaders,
    build_optimizer,
    build_scheduler,
    train_step,
    training_metadata,
)

torch.set_num_threads(1)
data, names, rounds = Path(sys.argv[1]), sys.argv[2:4], int(sys.argv[4])
spec = accuracy.load_benchmark_data(data)
base = accuracy.base_config(data, 100_000, None, cpu=True)
runs = {}
for name in names:
    config = accuracy.setup_config(name, base)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0))
    metadata = training_metadata(config, spec, len(spec.training), len(spec.test))
    train_set, eval_set = build_datasets(spec.training, spec.test, metadata, config, config.roi)
    model = accuracy.build_network(name, spec, config, spec.training).train()
    optimizer = build_optimizer(model, config)
    loader, _ = build_loaders(train_set, eval_set, config)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = build_scheduler(optimizer, config, config.max_steps)
    loss_fn = VeloxSegLoss(*accuracy.SETUPS[name].loss_weights())
    runs[name] = (model, optimizer, scheduler, loss_fn, accelerator, batches(loader, train_set, accelerator), config)
times = {name: [] for name in names}
for r in range(rounds):
    for name in names:
        model, optimizer, scheduler, loss_fn, accelerator, batch_iter, config = runs[name]
        for _ in range(5):
            start = time.thread_time()
            train_step(model, next(batch_iter), loss_fn, optimizer, scheduler, accelerator, max_grad_norm=config.max_grad_norm)
            if r:
                times[name].append(time.thread_time() - start)
means = {name: statistics.mean(t) for name, t in times.items()}
for name in names:
    print(f"{name}: mean {means[name]:.4f}, median {statistics.median(times[name]):.4f} CPU s a step ({len(times[name])} steps)")
print(f"ratio of means {names[0]} / {names[1]}: {means[names[0]] / means[names[1]]:.3f}")
