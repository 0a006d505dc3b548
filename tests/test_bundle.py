"""``veloxseg export --format monai-bundle``: the bundle runs with MONAI alone (no veloxseg importable) and
writes the label maps of ``veloxseg predict``; its TorchScript network is the eager one; MONAI's bundle checks
accept its infer workflow, metadata and network."""

import configparser
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out
from nibabel.testing import data_path

import veloxseg
from veloxseg.cli import main
from veloxseg.export import export
from veloxseg.metadata import ChannelInfo, ModelMetadata
from veloxseg.predict import predict

from .conftest import SMALL_ROI

DATA = Path(data_path)
# MONAI's bundle metadata schema, written from its specification (origin: the file's "$comment").
SCHEMA = Path(__file__).parent / "data" / "monai_bundle_metadata_schema.json"
# A Python where any import of veloxseg fails, as where it is not installed; with MONAI_BUNDLE after it,
# python -c runs python -m monai.bundle there.
WITHOUT_VELOXSEG = """import runpy, sys
class NoVeloxseg:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "veloxseg":
            raise ModuleNotFoundError(f"No module named {name!r} (this test runs without veloxseg)")
sys.meta_path.insert(0, NoVeloxseg())
"""
MONAI_BUNDLE = """sys.argv[0] = "monai.bundle"
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = veloxseg.create_model("veloxseg_tiny", **SMALL_ROI)
    channels = [
        ChannelInfo("T1", 0, "foreground_zscore"), ChannelInfo("T2", 1, "ct", clip=(0.0, 3000.0), mean=500.0, std=400.0)
    ]
    metadata = ModelMetadata(
        channels, {"background": 0, "lesion": 1}, spacing=(3.0, 2.5, 4.0), metrics={"dice": 0.5}, license="other",
        notice="Example data (C) its owners; keep with all copies.",
    )
    folder = model.save_pretrained(tmp_path_factory.mktemp("model") / "tiny", metadata=metadata)
    out = tmp_path_factory.mktemp("bundle") / "veloxseg_tiny_bundle"
    assert main(["export", "--model", f"local-dir:{folder}", "--format", "monai-bundle", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """Two cases: example4d's volumes as nnU-Net channel files (oblique affine), anatomical.nii as one
    2-channel file (LAS, anisotropic)."""
    folder = tmp_path_factory.mktemp("cases")
    img = nib.load(DATA / "example4d.nii.gz")
    for c in range(2):
        nib.save(nib.Nifti1Image(img.dataobj[..., c], img.affine, img.header), folder / f"scan_{c:04d}.nii.gz")
    anat = nib.load(DATA / "anatomical.nii")
    data = np.asarray(anat.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(np.stack([data, np.sqrt(np.abs(data))], -1), anat.affine), folder / "anat.nii.gz")
    return folder


def test_bundle_layout(bundle):
    files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert files == [
        "LICENSE", "configs/inference.json", "configs/logging.conf", "configs/metadata.json", "docs/README.md",
        "docs/data_license.txt", "models/NOTICE", "models/README.md", "models/config.json", "models/model.safetensors",
        "models/model.ts",
    ]  # fmt: skip
    notice = "Example data (C) its owners; keep with all copies."
    assert (bundle / "models" / "NOTICE").read_text() == notice
    assert (bundle / "docs" / "data_license.txt").read_text() == f"License: other\n\n{notice}"
    assert "licensed under other" in (bundle / "LICENSE").read_text()
    conf = configparser.ConfigParser(interpolation=None)  # logging.config.fileConfig's format
    conf.read(bundle / "configs" / "logging.conf")
    assert {"loggers", "handlers", "formatters", "logger_root"} <= set(conf.sections())
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert (image["num_channels"], image["spatial_shape"]) == (2, [64] * 3)
    assert image["channel_def"] == {"0": "T1", "1": "T2"}
    assert image["value_range"] == []  # T1 is z-scored: no bound
    assert (image["spacing"], image["orientation"]) == ([3.0, 2.5, 4.0], "RAS")
    assert (pred["num_channels"], pred["channel_def"]) == (2, {"0": "background", "1": "lesion"})
    assert meta["eval_metrics"] == {"dice": 0.5}
    assert "license" not in meta["copyright"].lower()
    assert set(meta["required_packages_version"]) == {"nibabel", "pytorch-ignite", "fire"}


def test_model_ts_is_the_eager_network(bundle):
    model = veloxseg.create_model(f"local-dir:{bundle / 'models'}").eval()
    traced = torch.jit.load(bundle / "models" / "model.ts")
    for batch in (1, 3):  # a free batch axis: sliding-window batches of any size
        x = torch.randn(batch, 2, *SMALL_ROI["roi_size"])
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x), atol=1e-4, rtol=1e-4)


def test_trace_leaves_out_the_compiled_cpu_kernels(bundle, tmp_path):
    model = veloxseg.create_model(f"local-dir:{bundle / 'models'}").eval()
    fused = [m for m in model.modules() if hasattr(m, "fused_kernel")]
    for module in fused:  # as veloxseg.optimize sets them
        module.fused_kernel = True
    export(model, tmp_path / "model.ts", "torchscript")
    graph = str(torch.jit.load(tmp_path / "model.ts").inlined_graph)
    assert set(re.findall(r"= (\w+)::", graph)) == {"aten", "prim"}  # no torch.ops.veloxseg
    assert fused and all(m.fused_kernel for m in fused)  # the model itself is left as it was


def test_monai_bundle_runs_without_veloxseg_writing_the_label_maps_of_veloxseg_predict(bundle, cases, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    blocked = subprocess.run(
        [sys.executable, "-c", WITHOUT_VELOXSEG + "import veloxseg"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert "this test runs without veloxseg" in blocked.stderr
    command = [
        sys.executable, "-c", WITHOUT_VELOXSEG + MONAI_BUNDLE, "run", "--config_file",
        str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle), "--dataset_dir", str(cases),
        "--output_dir", str(tmp_path), "--device", "cpu",
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    model = veloxseg.create_model(f"local-dir:{bundle / 'models'}")
    for case, sources in (("scan", ["scan_0000.nii.gz", "scan_0001.nii.gz"]), ("anat", ["anat.nii.gz"])):
        ours, theirs = nib.load(tmp_path / f"{case}.nii.gz"), predict(model, [cases / s for s in sources])
        labels = np.asarray(ours.dataobj)
        assert labels.shape == theirs.shape and np.allclose(ours.affine, theirs.affine)
        assert np.mean(labels == np.asarray(theirs.dataobj)) > 0.999
        assert set(np.unique(labels)) == {0, 1}  # both classes occur: the comparison says something
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anat.nii.gz", "scan.nii.gz"]


def test_monai_bundle_checks(bundle, tmp_path):
    config, meta = str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "metadata.json")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, device="cpu", bundle_root=str(bundle))
    workflow = ConfigWorkflow(
        config_file=config, meta_file=meta, logging_file=False, workflow_type="infer", bundle_root=str(bundle)
    )
    workflow.initialize()
    assert workflow.check_properties() == []  # MONAI's infer and meta properties
    renamed = json.loads(Path(config).read_text())
    renamed["windows"] = renamed.pop("inferer")  # the same workflow without the property "inferer"
    renamed["evaluator"]["inferer"] = "@windows"
    (tmp_path / "incomplete.json").write_text(json.dumps(renamed))
    workflow = ConfigWorkflow(
        config_file=str(tmp_path / "incomplete.json"), meta_file=meta, logging_file=False, workflow_type="infer",
        bundle_root=str(bundle),
    )  # fmt: skip
    workflow.initialize()
    with pytest.raises(KeyError, match="Property 'inferer'"):  # how MONAI reports a missing required property
        workflow.check_properties()
    verify_metadata(meta_file=meta, filepath=str(SCHEMA))  # the schema is there: nothing is downloaded
    broken = {k: v for k, v in json.loads(Path(meta).read_text()).items() if k != "monai_version"}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="monai_version"):
        verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=str(SCHEMA))


def test_existing_bundle_needs_overwrite(bundle):
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        veloxseg.bundle.export_bundle(veloxseg.create_model("veloxseg_tiny", **SMALL_ROI), bundle)


def test_bundle_for_a_subset_segments_cases_that_hold_those_channels(bundle, cases, tmp_path, recwarn):
    from veloxseg.bundle import export_bundle

    model = veloxseg.create_model(f"local-dir:{bundle / 'models'}")
    subset = export_bundle(model, tmp_path / "t2_bundle", present=["T2"])
    image = json.loads((subset / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    assert image["channel_def"] == {"0": "T2"}
    assert image["value_range"] == [-1.25, 6.25]  # T2's window [0, 3000] minus 500, divided by 400
    only_t2 = tmp_path / "in"
    only_t2.mkdir()
    (only_t2 / "scan_0000.nii.gz").write_bytes((cases / "scan_0001.nii.gz").read_bytes())
    workflow = ConfigWorkflow(
        config_file=str(subset / "configs" / "inference.json"), logging_file=False, workflow_type="infer",
        bundle_root=str(subset), dataset_dir=str(only_t2), output_dir=str(tmp_path / "out"), device="cpu",
    )  # fmt: skip
    workflow.initialize()
    workflow.run()
    ours = np.asarray(nib.load(tmp_path / "out" / "scan.nii.gz").dataobj)
    expected = np.asarray(predict(model, {"T2": cases / "scan_0001.nii.gz"}).dataobj)
    assert np.mean(ours == expected) > 0.999 and set(np.unique(ours)) == {0, 1}
    with pytest.raises(ValueError, match="unknown channel 'PET'"):
        export_bundle(model, tmp_path / "pet_bundle", present=["PET"])
    assert not (tmp_path / "pet_bundle").exists()
