"""Smoke test of benchmarks/missing_modality.py: (a), (b) and (c) on every subset of a 2-channel task."""

import json
from pathlib import Path

import pytest
import torch

from .conftest import benchmark_script


@pytest.fixture(scope="module")
def missing_modality():  # noqa: ANN201 - the benchmark script as a module
    return benchmark_script("missing_modality")


def test_every_method_on_every_subset(missing_modality, tmp_path: Path) -> None:
    from veloxseg.data.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "demo", num_train=4, num_test=1, shape=(32, 32, 32))
    out = tmp_path / "results" / "missing"
    rows = missing_modality.run_task(
        "veloxseg_tiny", data, 0.5, [0], None, 2, out=out, command="pytest", roi=(64, 32, 32), cpu=True
    )
    channels = ["CT", "PET"]
    assert [(r["method"], r["subset"]) for r in rows] == [
        ("dropout", channels), ("dropout", ["CT"]), ("dropout", ["PET"]),
        ("zero-filled", channels), ("zero-filled", ["CT"]), ("zero-filled", ["PET"]),
        ("dedicated", channels), ("dedicated", ["CT"]), ("dedicated", ["PET"]),
    ]  # fmt: skip
    assert all(r["steps"] == 2 and 0.0 <= r["dice_mean"] <= 1.0 for r in rows)
    assert rows[6]["dice"] == rows[3]["dice"]  # on every channel the dedicated model is (b)'s
    saved = json.loads(out.with_name("missing.json").read_text())
    assert saved["rows"] == rows and saved["commands"][0]["arms"] == [
        "dropout uniform 0.5", "zero-filled", "dedicated"  # the trainer's default: no warm-up
    ]
    summary = out.with_name("missing.md").read_text().split("## Every run")[0]
    assert "| CT + PET |" in summary and "| PET |" in summary and "(c) dedicated" in summary

    # another modality dropout joins the results without training (b) and (c) again
    added = missing_modality.run_task(
        "veloxseg_tiny", data, 0.25, [0], None, 2, out=out, command="pytest added", roi=(64, 32, 32), cpu=True,
        mode="per-group", methods=["dropout"], add=True,
    )  # fmt: skip
    assert [(r["method"], r["modality_dropout_mode"], r["modality_dropout"]) for r in added] == [
        ("dropout", "per-group", 0.25)
    ] * 3
    saved = json.loads(out.with_name("missing.json").read_text())
    assert saved["rows"] == rows + added
    assert [c["command"] for c in saved["commands"]] == ["pytest", "pytest added"]
    summary = out.with_name("missing.md").read_text().split("## Every run")[0]
    header = "| (a) dropout uniform 0.5 | (a) dropout per-group 0.25 | (b) zero-filled |"
    assert f"| channels given {header}" in summary
    assert "`pytest added`" in summary
    with pytest.raises(ValueError, match="made with other settings \\(seeds"):
        missing_modality.run_task(
            "veloxseg_tiny", data, 0.5, [1], None, 2, out=out, roi=(64, 32, 32), cpu=True, methods=["dropout"], add=True
        )
    with pytest.raises(ValueError, match="methods must be some of dropout, zero-filled, dedicated, got \\['dedicate"):
        missing_modality.run_task("veloxseg_tiny", data, 0.5, [0], None, 2, methods=["dedicate"])


def test_fill_trains_only_the_missing_rows(missing_modality, tmp_path: Path) -> None:
    from veloxseg.data.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "demo", num_train=4, num_test=1, shape=(32, 32, 32))
    out = tmp_path / "missing"
    settings = {"roi": (64, 32, 32), "cpu": True, "methods": ["zero-filled", "dedicated"]}
    rows = missing_modality.run_task("veloxseg_tiny", data, 0.5, [0], None, 2, out=out, command="first", **settings)
    saved_path = out.with_name("missing.json")
    saved = json.loads(saved_path.read_text())
    cut = [r for r in saved["rows"] if (r["method"], r["subset"]) != ("dedicated", ["PET"])]
    saved_path.write_text(json.dumps({**saved, "rows": cut}))  # a run cut short before its last training

    settings["methods"] = ["dedicated"]
    fill = {"out": out, "command": "fill", "fill": True, **settings}
    filled = missing_modality.run_task("veloxseg_tiny", data, 0.5, [0], None, 2, **fill)
    assert [(r["method"], r["subset"]) for r in filled] == [("dedicated", ["PET"])]  # nothing else trained
    saved = json.loads(saved_path.read_text())
    assert saved["rows"] == cut + filled and len(saved["rows"]) == len(rows)
    assert [c["command"] for c in saved["commands"]] == ["first", "fill"]
    assert "dedicated (refilled: dedicated PET seed 0) | `fill`" in out.with_name("missing.md").read_text()
    assert missing_modality.run_task("veloxseg_tiny", data, 0.5, [0], None, 2, **fill) == []


def test_zero_filling_and_leaving_out(missing_modality) -> None:
    import veloxseg

    from .conftest import SMALL_ROI

    model = veloxseg.create_model("veloxseg_tiny", group_channels=[1, 1], **SMALL_ROI).eval()
    x = torch.randn(1, 2, *SMALL_ROI["roi_size"])
    with torch.no_grad():
        zeroed = x.clone()
        zeroed[:, 0] = 0
        assert torch.equal(missing_modality.OnSubset(model, (1,), zero_fill=True)(x), model(zeroed))
        assert torch.equal(missing_modality.OnSubset(model, (1,), zero_fill=False)(x), model(x, present=[1]))
    assert missing_modality.channel_subsets(3) == [(0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,)]


def test_an_arms_name_says_its_warmup_and_consistency(missing_modality) -> None:
    row = {"method": "dropout", "modality_dropout": 0.5, "modality_dropout_mode": "uniform"}
    assert missing_modality.arm(row) == "dropout uniform 0.5"  # rows from before these options
    assert missing_modality.arm({**row, "modality_dropout_warmup": 0.3}) == "dropout uniform 0.5 warm-up 0.3"
    both = {**row, "modality_dropout_warmup": 0.3, "modality_consistency": 1.0}
    assert missing_modality.arm(both) == "dropout uniform 0.5 warm-up 0.3 consistency 1"
    assert missing_modality.arm({**row, "method": "dedicated"}) == "dedicated"
