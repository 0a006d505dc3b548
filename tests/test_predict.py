"""Whole-scan inference on nibabel's real test scans (oblique and anisotropic affines): geometry kept,
mapping back follows the anatomy, CLI == Python API, and every bad input rejected with nothing written."""

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.testing import data_path

import veloxseg
from veloxseg.cli import main
from veloxseg.metadata import ChannelInfo, ModelMetadata
from veloxseg.predict import mirrored, predict

from .conftest import SMALL_ROI, tiny_model

DATA = Path(data_path)
SPACING = (3.0, 2.5, 4.0)  # the model's, anisotropic: every test scan is resampled


def metadata(normalisation: str = "zscore", spacing: tuple[float, ...] | None = SPACING) -> ModelMetadata:
    channels = [ChannelInfo("T1", 0, normalisation), ChannelInfo("T2", 1, normalisation)]
    return ModelMetadata(channels=channels, labels={"background": 0, "lesion": 1}, spacing=spacing)


def two_channel(name: str) -> nib.Nifti1Image:
    """A 2-channel (X, Y, Z, 2) image of a nibabel test scan: its first two volumes, or a 3-D scan twice."""
    img = nib.load(DATA / name)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = data[..., :2] if data.ndim == 4 else np.stack([data, np.sqrt(np.abs(data))], axis=-1)
    return nib.Nifti1Image(data, img.affine, img.header)


@pytest.fixture(scope="module")
def model() -> veloxseg.VeloxSeg:
    return tiny_model(metadata())


@pytest.fixture
def case_files(tmp_path) -> list[Path]:
    """example4d's two volumes as nnU-Net channel files ``scan_0000.nii.gz``, ``scan_0001.nii.gz``."""
    img = nib.load(DATA / "example4d.nii.gz")
    files = [tmp_path / "in" / f"scan_{c:04d}.nii.gz" for c in range(2)]
    files[0].parent.mkdir()
    for c, path in enumerate(files):
        nib.save(nib.Nifti1Image(img.dataobj[..., c], img.affine, img.header), path)
    return files


def labels_of(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.mark.parametrize("name", ["example4d.nii.gz", "anatomical.nii", "functional.nii"])
def test_output_has_the_input_geometry(model, tmp_path, name):
    image = two_channel(name)
    out = tmp_path / "seg.nii.gz"
    returned = predict(model, image, out, save_probabilities=True)
    written = nib.load(out)
    assert written.shape == image.shape[:3]
    np.testing.assert_allclose(written.affine, image.affine, atol=1e-6)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(image.affine)
    assert written.header.get_data_dtype() == np.uint8
    labels = labels_of(out)
    np.testing.assert_array_equal(labels, np.asarray(returned.dataobj))
    assert set(np.unique(labels)) <= {0, 1}
    probs = np.asarray(nib.load(tmp_path / "seg_probabilities.nii.gz").dataobj)
    assert probs.shape == (*image.shape[:3], 2)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(-1), labels)


@pytest.mark.parametrize("spacing", [None, SPACING])
def test_labels_land_where_they_were_found(spacing):
    """A stand-in network labelling voxels where channel 0 is positive, on a pattern of world (mm)
    coordinates sampled on example4d's oblique LAS grid: mapped back through reorientation (and
    resampling), the labels must match the pattern, not a flipped or shifted copy of it (a shift by
    two voxels agrees on about 90% of the voxels)."""
    reference = nib.load(DATA / "example4d.nii.gz")
    ijk = np.indices(reference.shape[:3]).reshape(3, -1)
    x, y, z = (reference.affine[:3, :3] @ ijk + reference.affine[:3, 3:]).reshape(3, *reference.shape[:3])
    pattern = (np.sin(x / 10) * np.cos(y / 13) + 0.5 * np.sin(z / 7)).astype(np.float32)
    image = nib.Nifti1Image(np.stack([pattern, pattern], axis=-1), reference.affine)
    stand_in = veloxseg.create_model("veloxseg_tiny", **SMALL_ROI)
    stand_in.pretrained_cfg["veloxseg"] = metadata("none", spacing).to_dict()
    stand_in.forward = lambda x: torch.cat([-x[:, :1], x[:, :1]], 1)
    labels = np.asarray(predict(stand_in, image).dataobj)
    if spacing is None:  # reorientation only: exact
        np.testing.assert_array_equal(labels, pattern > 0)
    else:  # resampled there and back: boundary voxels may change, nothing moves
        assert np.mean(labels == (pattern > 0)) > 0.98


def test_cli_and_python_api_give_the_same_labels(model_dir, case_files, tmp_path):
    options = ["--overlap", "0.25", "--sw-batch-size", "2", "--device", "cpu", "--threads", "2"]
    command = ["predict", "--model", f"local-dir:{model_dir}", *options]
    single = tmp_path / "single.nii.gz"
    assert main([*command, "-i", str(case_files[0].parent / "scan"), "-o", str(single)]) == 0  # a case prefix
    # a folder of two cases: the channel files and one 4-D file
    other = two_channel("anatomical.nii")
    nib.save(other, case_files[0].parent / "other.nii")
    out_dir = tmp_path / "out"
    assert main([*command, "-i", str(case_files[0].parent), "-o", str(out_dir)]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["other.nii.gz", "scan.nii.gz"]

    loaded = veloxseg.create_model(f"local-dir:{model_dir}", pretrained=True)
    api = np.asarray(predict(loaded, case_files, overlap=0.25, sw_batch_size=2).dataobj)
    assert len(np.unique(api)) == 2, "a constant label map would make the comparison meaningless"
    np.testing.assert_array_equal(labels_of(single), api)
    np.testing.assert_array_equal(labels_of(out_dir / "scan.nii.gz"), api)
    written = nib.load(out_dir / "other.nii.gz")
    assert written.shape == other.shape[:3] and np.allclose(written.affine, other.affine)


def test_existing_output_replaced_only_with_overwrite(model, model_dir, case_files, tmp_path, capsys):
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"previous")
    args = ["predict", "--model", f"local-dir:{model_dir}", "-i", *map(str, case_files), "-o", str(out)]
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"previous"
    assert main([*args, "--overwrite"]) == 0
    assert nib.load(out).shape == nib.load(case_files[0]).shape
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "seg.nii.gz"]  # no temporary files left


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine), path)
    return path


def _bad_inputs(folder: Path) -> dict[str, tuple[list[Path], str]]:
    """name -> (input paths, expected message) for every kind of bad input."""
    rng = np.random.default_rng(0)
    volume = rng.random((20, 22, 18), dtype=np.float32)
    shifted = np.diag([2.0, 2.0, 3.0, 1.0])
    shifted[0, 3] = 5.0
    nan = volume.copy()
    nan[3, 4, 5] = np.nan
    unreadable = folder / "broken.nii.gz"
    unreadable.write_bytes(b"not a NIfTI file")
    good = _write(folder / "good_0000.nii.gz", volume)
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # header intact, voxels cut off
    return {
        "one channel for two": ([_write(folder / "one.nii.gz", volume)], "expects 2 input channel(s) (T1, T2), got 1"),
        "shapes differ": ([good, _write(folder / "b.nii.gz", volume[:-2])], "differs from"),
        "affines differ": ([good, _write(folder / "c.nii.gz", volume, shifted)], "affine differs"),
        "2-D image": ([_write(folder / "flat.nii.gz", volume[:, :, 0])], "not a 3-D volume"),
        "one slice": ([_write(folder / "slice.nii.gz", volume[:, :, :1])], "not a 3-D volume"),
        "NaN voxel": ([good, _write(folder / "nan.nii.gz", nan)], "holds 1 non-finite voxels (NaN/inf"),
        "unreadable file": ([good, unreadable], "cannot read"),
        "truncated file": ([good, truncated], "cannot read the voxels"),
        "missing file": ([good, folder / "absent.nii.gz"], "not found"),
    }


@pytest.mark.parametrize(
    "name", ["one channel for two", "shapes differ", "affines differ", "2-D image", "one slice", "NaN voxel",
             "unreadable file", "truncated file", "missing file"],
)  # fmt: skip
def test_bad_input_is_rejected_and_nothing_written(model_dir, tmp_path, capsys, name):
    inputs, message = _bad_inputs(tmp_path)[name]
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "out" / "seg.nii.gz"
    code = main(["predict", "--model", f"local-dir:{model_dir}", "-i", *map(str, inputs), "-o", str(out)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before


def test_output_equal_to_an_input_is_rejected(model, case_files, capsys):
    original = case_files[1].read_bytes()
    with pytest.raises(ValueError, match="is one of the inputs"):
        predict(model, case_files, case_files[1], overwrite=True)
    command = ["predict", "--model", "veloxseg_tiny", "--allow-untrained-head", "--overwrite", "-i"]
    assert main([*command, *map(str, case_files), "-o", str(case_files[1])]) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    folder = str(case_files[0].parent)
    assert main([*command, folder, "-o", folder]) == 2
    assert "is the input folder" in capsys.readouterr().err
    assert case_files[1].read_bytes() == original


def test_folder_with_one_bad_case_writes_nothing(model_dir, case_files, tmp_path, capsys):
    bad = np.asarray(nib.load(case_files[0]).dataobj, dtype=np.float32)
    bad[0, 0, 0] = np.inf
    for channel in range(2):  # "zzz" comes after the good case "scan"
        _write(case_files[0].parent / f"zzz_{channel:04d}.nii.gz", bad, nib.load(case_files[0]).affine)
    out_dir = tmp_path / "out"
    command = ["predict", "--model", f"local-dir:{model_dir}", "-i", str(case_files[0].parent), "-o", str(out_dir)]
    assert main(command) == 2
    assert "holds 1 non-finite voxels (NaN/inf" in capsys.readouterr().err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_channel_numbers_beyond_the_models_are_refused(case_files, tmp_path, capsys):
    case_files[1].rename(case_files[1].with_name("scan_0002.nii.gz"))
    command = ["predict", "--model", "veloxseg_tiny", "--allow-untrained-head", "-i", str(case_files[0].parent / "scan")]
    code = main([*command, "-o", str(tmp_path)])
    assert code == 2 and "channel(s) [2] do not exist: the model has 2 (" in capsys.readouterr().err


def test_a_case_with_some_channels_runs_on_their_groups(model, model_dir, case_files, tmp_path, capsys):
    """One T2 file, named by nnU-Net's number or the channel's name, given alone, by prefix, in a folder,
    as a dict or with present: the same labels, those of the network on T2 alone."""
    t2 = case_files[1]
    with pytest.warns(UserWarning, match="trained without modality dropout"):
        expected = predict(model, [t2])
    scan = veloxseg.predict.load_scan([t2])
    probs = veloxseg.predict.predict_probabilities(model, scan, present=[1])
    assert np.array_equal(np.asarray(expected.dataobj), probs.argmax(0).numpy())
    with pytest.warns(UserWarning):
        assert np.array_equal(np.asarray(predict(model, {"T2": t2}).dataobj), np.asarray(expected.dataobj))
        named = t2.rename(t2.with_name("scan_t2.nii.gz"))  # the metadata's channel name, any case
        assert np.array_equal(np.asarray(predict(model, [named]).dataobj), np.asarray(expected.dataobj))
        assert np.array_equal(np.asarray(predict(model, [named], present=[1]).dataobj), np.asarray(expected.dataobj))
    case_files[0].unlink()
    out = tmp_path / "out"
    cases = ((named, out / "scan.nii.gz"), (named.parent / "scan", out / "scan.nii.gz"), (named.parent, out))
    for inputs, output in cases:
        command = ["predict", "--model", f"local-dir:{model_dir}", "-i", str(inputs), "-o", str(output), "--overwrite"]
        assert main(command) == 0
        err = capsys.readouterr().err
        assert "scan: segmented from T2 only" in err and "the model was not trained on subsets" in err
        assert np.array_equal(labels_of(out / "scan.nii.gz"), np.asarray(expected.dataobj))


def test_a_model_trained_on_subsets_is_said_so_and_not_warned_about(case_files, recwarn):
    """The metadata's modality dropout decides: no warning on a subset, and the CLI's line names it."""
    trained = dataclasses.replace(metadata(), modality_dropout=0.5, modality_dropout_mode="uniform")
    predict(tiny_model(trained), [case_files[1]])
    assert not [w for w in recwarn if "modality dropout" in str(w.message)]
    assert veloxseg.predict._subset_note(trained, [1]) == (
        "segmented from T2 only (the other modality groups are missing; the model was trained with modality "
        "dropout 0.5 (uniform))"
    )


def test_a_file_that_names_no_channel_is_refused(model, case_files):
    unnamed = case_files[0].rename(case_files[0].with_name("scan_flair.nii.gz"))
    with pytest.raises(ValueError, match=r"got 1 from .*scan_flair.nii.gz; for a case with only some of them, name"):
        predict(model, [unnamed])


def test_present_errors_and_optimize_with_a_subset(model, model_dir, case_files, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="present names 2 channel"):
        predict(model, [case_files[0]], present=["T1", "T2"])
    with pytest.raises(ValueError, match="unknown channel 'PD'"):
        predict(model, [case_files[0]], present=["PD"])
    with pytest.raises(ValueError, match=r"channel\(s\) \[0\] given twice"):
        predict(model, {"T1": case_files[0], 0: case_files[1]})
    import veloxseg.predict as predict_module

    monkeypatch.setattr(predict_module, "optimize", lambda *_: pytest.fail("compiled for a case without a group"))
    case_files[1].unlink()
    command = ["predict", "--model", f"local-dir:{model_dir}", "-i", str(case_files[0]), "-o", str(tmp_path / "o.nii")]
    assert main([*command, "--optimize"]) == 2
    assert "--optimize compiles the network of every modality group" in capsys.readouterr().err


def test_bad_window_settings_are_rejected(model, case_files):
    with pytest.raises(ValueError, match="overlap"):
        predict(model, case_files, overlap=1.0)
    with pytest.raises(ValueError, match="sw_batch_size"):
        predict(model, case_files, sw_batch_size=0)


def test_cli_optimize_compiles_once_for_the_window_batch(model_dir, case_files, tmp_path, monkeypatch):
    """``--optimize`` hands the loaded model to veloxseg.optimize with the sliding-window batch size (the
    compiled path itself is tested in test_optimize.py); a rejected case compiles nothing."""
    import veloxseg.predict as predict_module

    calls = []

    def spy(model, batch_size):
        calls.append(batch_size)
        return model

    monkeypatch.setattr(predict_module, "optimize", spy)
    command = ["predict", "--model", f"local-dir:{model_dir}", "--optimize", "--sw-batch-size", "3"]
    assert main([*command, "-i", *map(str, case_files), "-o", str(tmp_path / "seg.nii.gz")]) == 0
    assert calls == [3] and (tmp_path / "seg.nii.gz").exists()
    assert main([*command, "-i", str(case_files[0]), "-o", str(tmp_path / "bad.nii.gz")]) == 2  # one channel for two
    assert calls == [3]


@pytest.mark.parametrize("channel_names", [["PET", "CT"], ["CT"], ["T1", "FLAIR"]])
def test_prediction_normalises_like_training(channel_names, tmp_path, monkeypatch):
    """The network input of prediction, from the metadata saved with the model, is the validation input
    of training (:func:`eval_transforms` of the trainer's metadata), voxel for voxel."""
    import veloxseg.predict as predict_module
    from veloxseg.data.transforms import channel_infos, eval_transforms

    generator = torch.Generator().manual_seed(0)
    volumes = torch.randn(len(channel_names), 12, 10, 8, generator=generator) * 800 + 100
    volumes[:, 0] = 0  # background the z-score must skip
    affine = np.diag([-2.0, -1.5, 3.0, 1.0])  # LPS: reoriented to RAS at both ends
    files = [tmp_path / f"scan_{c:04d}.nii.gz" for c in range(len(channel_names))]
    for volume, path in zip(volumes, files):
        nib.save(nib.Nifti1Image(volume.numpy(), affine), path)
    trained = ModelMetadata(channels=channel_infos(channel_names), labels={"background": 0, "lesion": 1})
    validation_input = eval_transforms(trained)({"image": files})["image"].as_tensor()

    model = veloxseg.create_model("veloxseg_tiny", group_channels=[1] * len(channel_names), **SMALL_ROI)
    model.pretrained_cfg["veloxseg"] = trained.to_dict()
    model = veloxseg.create_model(f"local-dir:{model.save_pretrained(tmp_path / 'model')}")  # what was saved
    inputs = []

    def record(x, roi_size, **kwargs):
        inputs.append(x)
        return torch.zeros(1, 2, *x.shape[2:])

    monkeypatch.setattr(predict_module, "sliding_window_inference", record)
    predict_module.predict_probabilities(model, predict_module.load_scan(files))
    torch.testing.assert_close(inputs[0][0], validation_input, rtol=0, atol=0)
    assert validation_input.abs().max() > 0.1  # a real mapping, not all zeros


def test_veloxseg_predict_stays_the_function_after_the_submodule_is_imported(model, case_files):
    """``veloxseg.predict(...)`` segments whether or not ``veloxseg.predict`` was imported as a module."""
    import importlib

    importlib.import_module("veloxseg.predict")
    first = np.asarray(veloxseg.predict(model, case_files).dataobj)
    again = np.asarray(veloxseg.predict(model, case_files).dataobj)
    assert first.shape == nib.load(case_files[0]).shape and np.array_equal(first, again)


def test_mirroring_averages_the_flipped_windows_back_in_place():
    ramp = torch.arange(4.0).view(1, 1, 4, 1, 1)  # a predictor that knows where it is along the first axis
    windows = torch.randn(2, 1, 4, 3, 5)
    mirrored_once = mirrored(lambda w: w + ramp, (0,))(windows)
    torch.testing.assert_close(mirrored_once, windows + (ramp + ramp.flip(2)) / 2)
    equivariant = mirrored(lambda w: 3 * w, (0, 1, 2))  # flips change nothing for a voxel-wise predictor
    torch.testing.assert_close(equivariant(windows), 3 * windows)
    assert mirrored(torch.relu, ()) is torch.relu
    for bad in [(3,), (0, 0), (-1,)]:
        with pytest.raises(ValueError, match="mirror_axes"):
            mirrored(torch.relu, bad)


def test_tta_runs_every_mirror_in_cli_and_api(model, model_dir, case_files, tmp_path, monkeypatch):
    calls = []
    forward = veloxseg.VeloxSeg.forward
    monkeypatch.setattr(veloxseg.VeloxSeg, "forward", lambda self, x, *a, **k: calls.append(x) or forward(self, x, *a, **k))
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "--model", f"local-dir:{model_dir}", "-i", *map(str, case_files), "-o", str(out), "--tta"]) == 0
    windows = len(calls)
    assert windows % 8 == 0 and windows > 0
    calls.clear()
    api = predict(model, case_files, mirror_axes=(0, 1, 2))
    assert len(calls) == windows, "the API and the CLI mirror alike"
    calls.clear()
    plain = predict(model, case_files)
    assert len(calls) == windows // 8
    assert api.shape == plain.shape == nib.load(out).shape
    with pytest.raises(ValueError, match="mirror_axes"):
        predict(model, case_files, mirror_axes=(1, 5))


def test_a_published_tag_without_dropout_names_its_anymod_twin(model, case_files, monkeypatch):
    from veloxseg.variants import PUBLISHED

    twins = [name.removesuffix("_anymod") for name in PUBLISHED if name.endswith("_anymod")]
    assert twins and all(twin in PUBLISHED for twin in twins)  # every _anymod tag has its full-modality twin
    architecture, tag = twins[0].split(".")
    monkeypatch.setattr(model, "pretrained_cfg", {"architecture": architecture, "tag": tag}, raising=False)
    with pytest.warns(UserWarning, match=f"the tag {twins[0]}_anymod was trained for them"):
        predict(model, [case_files[1]])
    monkeypatch.setattr(model, "pretrained_cfg", {"architecture": architecture, "tag": "ssl_generalist"})
    with pytest.warns(UserWarning, match="train with --modality-dropout"):
        predict(model, [case_files[1]])
