"""ONNX and TorchScript export: the exported model matches PyTorch (onnxruntime on CPU), keeps a free
batch axis, carries the config and metadata, and is written atomically and only over with --overwrite."""

import dataclasses
import json
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

import veloxseg
from veloxseg.cli import main
from veloxseg.export import export
from veloxseg.metadata import ModelMetadata

from .conftest import SMALL_ROI

NOTICE = "Derived from the Example Atlas (C) its authors: keep this notice with all copies.\n"


@pytest.fixture(scope="module")
def model() -> veloxseg.VeloxSeg:
    """A tiny model whose weights carry a license and a notice."""
    torch.manual_seed(0)
    model = veloxseg.create_model("veloxseg_tiny", **SMALL_ROI).eval()
    metadata = ModelMetadata.from_dict(model.pretrained_cfg["veloxseg"])
    model.pretrained_cfg["veloxseg"] = dataclasses.replace(metadata, license="cc-by-4.0", notice=NOTICE).to_dict()
    return model


def reference(model: veloxseg.VeloxSeg, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a random input of ``batch`` windows, the PyTorch logits for it)."""
    x = torch.randn(batch, 2, *SMALL_ROI["roi_size"])
    with torch.no_grad():
        return x, model(x)


def test_onnx_export_runs_in_onnxruntime_like_pytorch(model, tmp_path):
    path = tmp_path / "tiny.onnx"
    reported = export(model, path, "onnx")
    assert 0 <= reported < 1e-4
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    x, expected = reference(model, batch=3)  # not the export's batch size: the batch axis is free
    (logits,) = session.run(None, {"image": x.numpy()})
    assert logits.shape == (3, 2, *SMALL_ROI["roi_size"])
    assert (torch.from_numpy(logits) - expected).abs().max().item() < 1e-4
    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    assert json.loads(props["veloxseg_config"]) == model.config.to_dict()
    assert json.loads(props["veloxseg_metadata"])["labels"] == {"background": 0, "class_1": 1}
    assert (props["license"], props["NOTICE"]) == ("cc-by-4.0", NOTICE)  # the weights' terms travel with them


def test_torchscript_export_through_the_cli(model, tmp_path, capsys):
    folder = model.save_pretrained(tmp_path / "tiny")
    path = tmp_path / "tiny.pt"
    args = ["export", "--model", f"local-dir:{folder}", "--format", "torchscript", "-o", str(path)]
    assert main(args) == 0
    assert "max abs difference from PyTorch on random input" in capsys.readouterr().out
    extra = {"veloxseg.json": "", "NOTICE": ""}
    loaded = torch.jit.load(path, _extra_files=extra)
    assert json.loads(json.loads(extra["veloxseg.json"])["veloxseg_config"]) == model.config.to_dict()
    assert extra["NOTICE"].decode() == NOTICE and json.loads(extra["veloxseg.json"])["license"] == "cc-by-4.0"
    x, expected = reference(model, batch=1)
    with torch.no_grad():
        assert (loaded(x) - expected).abs().max().item() < 1e-4

    written = path.read_bytes()
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err and path.read_bytes() == written


def test_failed_check_writes_nothing(model, tmp_path):
    with pytest.raises(ValueError, match="differs from PyTorch"):
        export(model, tmp_path / "tiny.pt", "torchscript", tolerance=0.0)  # no difference is below 0
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_is_rejected(model, tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export(model, tmp_path / "tiny.tflite", "tflite")
    assert not Path(tmp_path / "tiny.tflite").exists()


def test_export_of_a_subset_takes_its_groups_channels_only(model, tmp_path, capsys):
    path = tmp_path / "second.onnx"
    assert export(model, path, "onnx", present=["group1_channel0"]) < 1e-4
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, *SMALL_ROI["roi_size"])
    (logits,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(logits) - model(x, present=[1])).abs().max().item() < 1e-4
    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    assert json.loads(props["veloxseg_present"]) == ["group1_channel0"]
    assert [c["name"] for c in json.loads(props["veloxseg_metadata"])["channels"]] == ["group1_channel0"]
    folder = model.save_pretrained(tmp_path / "tiny")
    args = ["export", "--model", f"local-dir:{folder}", "--format", "torchscript", "-o", str(tmp_path / "t.pt")]
    assert main([*args, "--present", "group1_channel"]) == 2
    assert "unknown channel 'group1_channel' (did you mean 'group1_channel0'?)" in capsys.readouterr().err
    assert not (tmp_path / "t.pt").exists()
    assert main([*args, "--present", "group0_channel0"]) == 0
    with torch.no_grad():
        assert (torch.jit.load(tmp_path / "t.pt")(x) - model(x, present=[0])).abs().max().item() < 1e-4
