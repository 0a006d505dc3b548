"""Smoke tests of benchmarks/accuracy.py: a few training steps or a CPU budget, test-set scoring, and the
learning-rate search on a validation split."""

import json
from pathlib import Path

import pytest

from .conftest import benchmark_script


@pytest.fixture(scope="module")
def accuracy():  # noqa: ANN201 - the benchmark script as a module
    return benchmark_script("accuracy")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from veloxseg.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("data") / "demo", num_train=5, num_test=2, shape=(32, 32, 32))


def test_accuracy_benchmark_rows(accuracy, data: Path, tmp_path: Path) -> None:
    # VeloxSeg needs 64 voxels on some axis: the 32^3 volumes are padded to the ROI.
    models = ["UNet", "veloxseg_small_hr", "veloxseg_small-paper"]
    out = tmp_path / "results" / "accuracy"
    rows = accuracy.run_benchmark(
        models, data, steps=2, roi=(64, 32, 32), out=out, command="pytest", cpu=True, seeds=(0, 1)
    )
    assert [r["model"] for r in rows] == models * 2 and [r["seed"] for r in rows] == [0, 0, 0, 1, 1, 1]
    for row in rows:
        assert list(row["dice"]) == ["lesion"] and row["steps"] == 2
        assert 0.0 <= row["dice"]["lesion"] <= 1.0 and 0.0 <= row["dice_mean"] <= 1.0
        assert row["params_m"] <= row["trained_params_m"] and row["step_s"] > 0.0
    default, paper = rows[1], rows[2]
    assert default["params_m"] == default["trained_params_m"]  # default recipe: no teachers, one head
    assert paper["params_m"] < paper["trained_params_m"] and paper["lr"] == 2.5e-4  # teachers, 4 heads

    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["rows"] == rows and saved["run"]["steps"] == 2 and saved["run"]["test_cases"] == 2
    summary = [line for line in out.with_suffix(".md").read_text().split("## Every run")[0].splitlines()
               if line.startswith("| ")]  # fmt: skip
    assert [line.split("|")[1].strip() for line in summary[2:]] == models
    mean = float(summary[2].split("|")[5].strip(" *"))
    assert mean == pytest.approx((rows[0]["dice_mean"] + rows[3]["dice_mean"]) / 2, abs=1e-3)
    assert out.with_suffix(".png").stat().st_size > 0


def test_cpu_budget_stops_training_and_schedules_over_it(accuracy, data: Path) -> None:
    import torch

    rows = accuracy.run_benchmark(["UNet"], data, roi=(32, 32, 32), minutes=0.05, cpu=True)
    assert rows[0]["steps"] >= 1 and rows[0]["train_cpu_min"] == pytest.approx(0.05, abs=0.05)
    spent = iter([0.0, 0.025, 0.05, 0.5, 1.0])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    config = accuracy.TrainConfig(lr=1.0, min_lr=0.01)
    scheduler = accuracy.budget_scheduler(optimizer, config, lambda: next(spent))
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0) and lrs[4] == pytest.approx(0.01)
    assert 0.01 < lrs[3] < 1.0


def test_search_records_the_best_rate_on_validation(accuracy, data: Path, tmp_path: Path, monkeypatch) -> None:
    seen = []

    def fake_run(name, spec, train_cases, eval_cases, config, minutes=None):  # noqa: ANN001, ANN202
        seen.append(({c.case_id for c in train_cases}, {c.case_id for c in eval_cases}))
        return {"dice_mean": 1.0 - abs(config.lr - 4e-3)}  # best at 4e-3

    monkeypatch.setattr(accuracy, "run", fake_run)
    record_path = tmp_path / "learning_rates.json"
    accuracy.search_learning_rates(["UNet", "veloxseg_small-paper"], [data], None, 2, roi=(64, 32, 32),
                                   record_path=record_path, cpu=True)  # fmt: skip
    record = json.loads(record_path.read_text())["setups"]
    assert record["UNet"]["lr"] == 4e-3 and set(record["UNet"]["validation_dice"]) == {"0.002", "0.004", "0.008"}
    assert "veloxseg_small-paper" not in record  # the paper's rate is the paper's
    test_ids = {c.case_id for c in accuracy.read_dataset(data).test}
    for train_ids, eval_ids in seen:
        assert eval_ids and not train_ids & eval_ids and not eval_ids & test_ids  # never the test set


def test_search_over_new_rates_extends_the_recorded_grid(accuracy, data: Path, tmp_path: Path, monkeypatch) -> None:
    peak = {"lr": 4e-3, "dice": 0.9}
    monkeypatch.setattr(accuracy, "run", lambda name, spec, tr, ev, config, minutes=None: {
        "dice_mean": peak["dice"] - abs(config.lr - peak["lr"])})  # fmt: skip
    record_path = tmp_path / "learning_rates.json"
    search = dict(minutes=None, steps=2, roi=(64, 32, 32), record_path=record_path, cpu=True)
    accuracy.search_learning_rates(["UNet"], [data], **search)
    accuracy.search_learning_rates(["UNet"], [data], grid=(1.6e-2,), **search)  # worse than 4e-3: the choice stays
    record = json.loads(record_path.read_text())["setups"]["UNet"]
    assert record["lr"] == 4e-3 and set(record["validation_dice"]) == {"0.002", "0.004", "0.008", "0.016"}
    peak.update(lr=1.6e-2, dice=0.95)  # a new run at 1.6e-2 now beats the recorded 4e-3
    accuracy.search_learning_rates(["UNet"], [data], grid=(1.6e-2,), **search)
    assert json.loads(record_path.read_text())["setups"]["UNet"]["lr"] == 1.6e-2
    accuracy.search_learning_rates(["UNet"], [data], grid=(1e-3,), **{**search, "steps": 3})  # another budget
    assert set(json.loads(record_path.read_text())["setups"]["UNet"]["validation_dice"]) == {"0.001"}
    monkeypatch.setattr(accuracy.torch.backends.cpu, "get_cpu_capability", lambda: "another CPU")
    accuracy.search_learning_rates(["UNet"], [data], grid=(2e-3,), **{**search, "steps": 3})
    assert set(json.loads(record_path.read_text())["setups"]["UNet"]["validation_dice"]) == {"0.002"}


def test_searches_side_by_side_keep_each_others_rates(accuracy, data: Path, tmp_path: Path, monkeypatch) -> None:
    record_path = tmp_path / "learning_rates.json"

    def run_while_another_search_records(name, spec, tr, ev, config, minutes=None):  # noqa: ANN001, ANN202
        if not record_path.is_file():  # a search of SegResNet in another process finishes meanwhile
            record_path.write_text(json.dumps({"setups": {"SegResNet": {"lr": 2e-3}}}))
        return {"dice_mean": 1.0 - abs(config.lr - 4e-3)}

    monkeypatch.setattr(accuracy, "run", run_while_another_search_records)
    accuracy.search_learning_rates(["UNet"], [data], None, 2, roi=(64, 32, 32), record_path=record_path, cpu=True)
    record = json.loads(record_path.read_text())["setups"]
    assert record["SegResNet"] == {"lr": 2e-3} and record["UNet"]["lr"] == 4e-3


def test_search_averages_over_seeds(accuracy, data: Path, tmp_path: Path, monkeypatch) -> None:
    seen_seeds = set()

    def fake_run(name, spec, train_cases, eval_cases, config, minutes=None):  # noqa: ANN001, ANN202
        seen_seeds.add(config.seed)
        best = 4e-3 if config.seed == 0 else 8e-3  # seed 0 prefers 4e-3 a little, seed 1 8e-3 a lot
        return {"dice_mean": 1.0 - abs(config.lr - best) * (1 if config.seed == 0 else 10)}

    monkeypatch.setattr(accuracy, "run", fake_run)
    record_path = tmp_path / "learning_rates.json"
    search = dict(minutes=None, steps=2, roi=(64, 32, 32), record_path=record_path, cpu=True)
    accuracy.search_learning_rates(["UNet"], [data], **search)
    assert json.loads(record_path.read_text())["setups"]["UNet"]["lr"] == 4e-3
    accuracy.search_learning_rates(["UNet"], [data], seeds=(1,), **search)  # adds seed 1 to the recorded seed 0
    record = json.loads(record_path.read_text())["setups"]["UNet"]
    assert set(record["validation_dice"]["0.004"]) == {data.name, f"{data.name}, seed 1"}
    assert record["lr"] == 8e-3 and seen_seeds == {0, 1}


@pytest.mark.parametrize("grid", [(), (4e-3, 0.0), (-1e-3,)])
def test_search_refuses_a_grid_without_positive_rates(accuracy, data: Path, tmp_path: Path, grid) -> None:
    with pytest.raises(ValueError, match="rates > 0"):
        accuracy.search_learning_rates(["UNet"], [data], None, 2, grid=grid, record_path=tmp_path / "lr.json")
    assert not (tmp_path / "lr.json").exists()


def test_result_names_with_a_dot_keep_it(accuracy, tmp_path: Path) -> None:
    # runs named by their rate must not overwrite each other: "x-lr0.004" and "x-lr0.008" are two results
    row = {"model": "UNet", "loss": "L_seg", "seed": 0, "lr": 4e-3, "dice": {"lesion": 0.5}, "dice_mean": 0.5,
           "hd95_mm": None, "params_m": 1.0, "trained_params_m": 1.0, "steps": 1, "step_s": 0.1,
           "train_min": 0.1, "train_cpu_min": 0.1, "test_s": 1.0, "final_train_loss": 1.0}
    for lr in ("0.004", "0.008"):
        info = {"data": "demo", "train_cases": 1, "test_cases": 1, "budget": "1 steps", "batch_size": 2,
                "roi": [32, 32, 32], "optimizer": "AdamW", "seeds": [0], "device": "CPU", "torch_threads": 1,
                "load_average_start": 0.0, "load_average_end": 0.0, "wall_min": 0.1, "command": lr}
        accuracy.write_results([{**row, "lr": float(lr)}], info, tmp_path / f"x-lr{lr}")
    for lr in ("0.004", "0.008"):
        assert json.loads((tmp_path / f"x-lr{lr}.json").read_text())["rows"][0]["lr"] == float(lr)
