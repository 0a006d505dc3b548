"""``veloxseg export --format monai-bundle``: the bundle run by MONAI's own runner writes the label maps of
``veloxseg predict``, and MONAI's bundle checks accept its metadata and network."""

import configparser
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out
from monai.bundle.utils import DEFAULT_METADATA
from nibabel.testing import data_path

import veloxseg
from veloxseg.cli import main
from veloxseg.metadata import ChannelInfo, ModelMetadata

from .conftest import SMALL_ROI

DATA = Path(data_path)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = veloxseg.create_model("veloxseg_tiny", **SMALL_ROI)
    channels = [ChannelInfo("T1", 0), ChannelInfo("T2", 1, "ct", clip=(0.0, 3000.0), mean=500.0, std=400.0)]
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
    assert (pred["num_channels"], pred["channel_def"]) == (2, {"0": "background", "1": "lesion"})
    assert meta["eval_metrics"] == {"dice": 0.5}


def test_monai_bundle_run_writes_the_label_maps_of_veloxseg_predict(bundle, cases, tmp_path):
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
        "--bundle_root", str(bundle), "--dataset_dir", str(cases), "--output_dir", str(tmp_path / "bundle"),
        "--device", "cpu",
    ]  # fmt: skip
    run = subprocess.run(command, env={"OMP_NUM_THREADS": "1", "PATH": ""}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    predict = ["predict", "--model", f"local-dir:{bundle / 'models'}", "-i", str(cases), "-o", str(tmp_path / "cli")]
    assert main(predict) == 0
    for case, source in (("scan", "scan_0000.nii.gz"), ("anat", "anat.nii.gz")):
        ours, theirs = nib.load(tmp_path / "bundle" / f"{case}.nii.gz"), nib.load(tmp_path / "cli" / f"{case}.nii.gz")
        labels = np.asarray(ours.dataobj)
        np.testing.assert_array_equal(labels, np.asarray(theirs.dataobj))
        assert set(np.unique(labels)) == {0, 1}  # both classes occur: the comparison says something
        original = nib.load(cases / source)
        assert ours.shape == original.shape[:3] and np.allclose(ours.affine, original.affine)


def test_monai_bundle_checks(bundle, tmp_path):
    config, meta = str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "metadata.json")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, device="cpu", bundle_root=str(bundle))
    workflow = ConfigWorkflow(config_file=config, meta_file=meta, workflow_type=None, bundle_root=str(bundle))
    workflow.initialize()
    assert workflow.check_properties() == []  # MONAI's meta properties
    assert workflow.parser.get_parsed_content("network_def").config == veloxseg.create_model(
        f"local-dir:{bundle / 'models'}"
    ).config
    # verify_metadata downloads MONAI's schema (no network here): check against a schema requiring
    # every field of MONAI's own DEFAULT_METADATA, typed as there, and the spec's tensor fields.
    tensor = {"required": ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "channel_def"]}
    schema = {
        "type": "object",
        "required": [*DEFAULT_METADATA, "schema"],
        "properties": {
            **{key: {"type": _json_type(value)} for key, value in DEFAULT_METADATA.items()},
            "network_data_format": {
                "type": "object",
                "properties": {
                    "inputs": {"required": ["image"], "additionalProperties": tensor},
                    "outputs": {"required": ["pred"], "additionalProperties": tensor},
                },
            },
        },
    }
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    verify_metadata(meta_file=meta, filepath=str(tmp_path / "schema.json"))
    broken = {k: v for k, v in json.loads(Path(meta).read_text()).items() if k != "monai_version"}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="monai_version"):
        verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=str(tmp_path / "schema.json"))


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string"}[type(value)]


def test_existing_bundle_needs_overwrite(bundle):
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        veloxseg.bundle.export_bundle(veloxseg.create_model("veloxseg_tiny", **SMALL_ROI), bundle)


def test_bundle_for_a_subset_segments_cases_that_hold_those_channels(bundle, cases, tmp_path, recwarn):
    from veloxseg.bundle import export_bundle, segment_cases
    from veloxseg.predict import predict

    model = veloxseg.create_model(f"local-dir:{bundle / 'models'}")
    subset = export_bundle(model, tmp_path / "t2_bundle", present=["T2"])
    meta = json.loads((subset / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["channel_def"] == {"0": "T2"}
    assert json.loads((subset / "configs" / "inference.json").read_text())["present"] == ["T2"]
    only_t2 = tmp_path / "in"
    only_t2.mkdir()
    (only_t2 / "scan.nii.gz").write_bytes((cases / "scan_0001.nii.gz").read_bytes())
    (written,) = segment_cases(model, only_t2, tmp_path / "out", present=["T2"])
    expected = predict(model, {"T2": cases / "scan_0001.nii.gz"})
    assert np.array_equal(np.asarray(nib.load(written).dataobj), np.asarray(expected.dataobj))
    with pytest.raises(ValueError, match="unknown channel 'PET'"):
        export_bundle(model, tmp_path / "pet_bundle", present=["PET"])
    assert not (tmp_path / "pet_bundle").exists()
