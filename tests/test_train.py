"""The trainer: loss, stages, resume after a kill, checkpoint safety, data checks, command line.

Runs use veloxseg_tiny at a 64^3 ROI on a 4-case demo dataset of 40 x 40 x 32 voxels.
"""

import dataclasses
import json
import runpy
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

import veloxseg
import veloxseg.hub
import veloxseg.training.data
import veloxseg.training.loop
from veloxseg.data import DatasetError, make_demo_dataset
from veloxseg.losses import VeloxSegLoss
from veloxseg.model import VeloxSegOutput
from veloxseg.training import (
    RECIPES,
    TrainConfig,
    TrainResult,
    build_model,
    build_optimizer,
    build_scheduler,
    modality_dropout_at,
    resolve,
    scaled_windows,
    train,
    train_step,
)
from veloxseg.training.checkpoints import TRAINER_STATE, latest_checkpoint
from veloxseg.training.step import mask_random_patches, modality_consistency_term

from .conftest import SMALL_ROI

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(model="veloxseg_tiny", roi=64, num_workers=0, progress=False, log_every=1, val_every=100)


def small_demo(out: Path) -> Path:
    return make_demo_dataset(out, num_train=4, num_test=0, shape=(40, 40, 32))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads spin-wait each other and run ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_demo(tmp_path_factory.mktemp("demo") / "Dataset001_Demo")


def run(**kwargs) -> TrainResult:
    """One training run in a fresh Accelerate state (it is a per-process singleton)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return train(TrainConfig(**{**FAST, **kwargs}))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


# The loss and the small pieces


def fake_output(n_classes: int = 2, groups: int = 2) -> VeloxSegOutput:
    shape = (2, n_classes, 8, 8, 8)
    return VeloxSegOutput(
        logits=[torch.randn(shape, requires_grad=True) for _ in range(4)],
        reconstruction=torch.randn(2, groups, 8, 8, 8, requires_grad=True),
        gram=torch.randn(2, 4, 4, requires_grad=True),
        teacher_grams=[torch.randn(2, 4, 4, requires_grad=True) for _ in range(groups)],
    )


def test_loss_is_the_weighted_sum_of_its_terms() -> None:
    out, image, label = fake_output(), torch.randn(2, 2, 8, 8, 8), torch.randint(0, 2, (2, 1, 8, 8, 8))
    terms = VeloxSegLoss(seg_weight=1.0, rc_weight=0.5, sdkt_weight=2.0)(out, image, label)
    assert torch.allclose(terms["loss"], terms["seg"] + 0.5 * terms["rc"] + 2.0 * terms["sdkt"])
    assert torch.allclose(terms["rc"], ((out.reconstruction - image) ** 2).mean())
    sdkt = sum(((out.gram - g) ** 2).mean() for g in out.teacher_grams) / 2
    assert torch.allclose(terms["sdkt"], sdkt)
    assert set(VeloxSegLoss(0.0, 1.0, 0.0)(out, image)) == {"rc", "loss"}  # pretraining: no labels needed


def test_one_way_sdkt_sends_no_gradient_to_the_teachers() -> None:
    for one_way in (False, True):
        out = fake_output()
        VeloxSegLoss(0.0, 0.0, 1.0, one_way_sdkt=one_way)(out, torch.zeros(2, 2, 8, 8, 8))["loss"].backward()
        assert out.gram.grad.abs().sum() > 0
        assert all((g.grad is None) == one_way for g in out.teacher_grams)


def test_loss_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="weights must be >= 0"):
        VeloxSegLoss(seg_weight=-1.0)
    with pytest.raises(ValueError, match="needs labels"):
        VeloxSegLoss()(fake_output(), torch.zeros(2, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="teachers"):
        VeloxSegLoss()(
            VeloxSegOutput(logits=fake_output().logits), torch.zeros(2, 2, 8, 8, 8), torch.zeros(2, 1, 8, 8, 8)
        )


def test_mask_random_patches_zeroes_whole_cubes() -> None:
    x = torch.ones(2, 2, 32, 32, 32)
    masked = mask_random_patches(x, 0.5, 8)
    cubes = masked[:, 0].reshape(2, 4, 8, 4, 8, 4, 8).permute(0, 1, 3, 5, 2, 4, 6).reshape(2, 64, -1)
    assert ((cubes == 0).all(-1) | (cubes == 1).all(-1)).all()  # each cube kept or zeroed whole
    assert torch.equal(masked[:, 0], masked[:, 1])  # the same cubes in every channel
    assert 0.3 < (cubes[..., 0] == 0).float().mean() < 0.7
    with pytest.raises(ValueError, match="must divide"):
        mask_random_patches(torch.ones(1, 1, 20, 20, 20), 0.5, 8)


def test_scaled_windows_follow_the_roi() -> None:
    windows = veloxseg.VeloxSegConfig().big_windows  # built for 96^3
    assert scaled_windows(windows, (96, 96, 96), (64, 64, 64)) == SMALL_ROI["big_windows"]
    assert scaled_windows(windows, (96, 96, 96), (128, 96, 64))[1] == [8, 6, 4]
    with pytest.raises(ValueError, match="each axis must be a multiple of"):
        scaled_windows(windows, (96, 96, 96), (80, 80, 80))


def test_optimizer_is_fused_adamw_of_the_trainable_parameters() -> None:
    """AdamW with the config's rate and decay, fused on the CPU, over the parameters that train only, with
    no decay on biases; its update equals the for-loop AdamW's."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.05))
    assert optimizer.defaults["fused"] and optimizer.defaults["lr"] == 1e-2
    assert optimizer.defaults["weight_decay"] == 0.05
    decay = {g["weight_decay"]: [id(p) for p in g["params"]] for g in optimizer.param_groups}
    assert decay == {0.0: [id(model[1].bias)], 0.05: [id(model[1].weight)]}
    reference = [p.detach().clone().requires_grad_() for p in model[1].parameters()]
    loop = torch.optim.AdamW(
        [{"params": reference[:1]}, {"params": reference[1:], "weight_decay": 0.0}], lr=1e-2, weight_decay=0.05,
        foreach=False,
    )  # fmt: skip
    for params in (list(model[1].parameters()), reference):
        for p in params:
            p.grad = torch.ones_like(p)
    optimizer.step()
    loop.step()
    for got, want in zip(model[1].parameters(), reference):
        torch.testing.assert_close(got, want)


def test_schedule_warms_up_then_decays_to_min_lr() -> None:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.5e-4)
    scheduler = build_scheduler(optimizer, TrainConfig(warmup_steps=10), total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(2.5e-5) and lrs[10] == pytest.approx(2.5e-4)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert scheduler.get_last_lr()[0] == pytest.approx(6e-6)


def test_build_model_reads_a_saved_models_weights_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = veloxseg.create_model("veloxseg_tiny", **SMALL_ROI).save_pretrained(tmp_path / "tiny")
    real_read, reads = veloxseg.hub.read_weights, []

    def counted_read(path):
        reads.append(path)
        return real_read(path)

    monkeypatch.setattr(veloxseg.hub, "read_weights", counted_read)
    spec = SimpleNamespace(channel_names=["CT", "PET"], labels={"background": 0, "lesion": 1})
    model = build_model(resolve(TrainConfig(model=f"local-dir:{folder}", pretrained=True)), spec)
    assert len(reads) == 1 and model.config.roi_size == (64, 64, 64)


def test_overfits_a_single_batch() -> None:
    torch.manual_seed(0)
    model = veloxseg.create_model("veloxseg_tiny", **SMALL_ROI, attn_drop=0.0, proj_drop=0.0, conv_drop=0.0)
    image = torch.randn(1, 2, 64, 64, 64)
    label = torch.zeros(1, 1, 64, 64, 64)
    label[:, :, 20:40, 24:44, 16:36] = 1
    image[:, 1] += 2 * label[:, 0]  # the "lesion" is bright in the second channel
    loss_fn, optimizer = VeloxSegLoss(), torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        terms = loss_fn(model(image), image, label)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append({k: v.item() for k, v in terms.items()})
    for name in ("loss", "seg", "rc"):
        assert losses[-1][name] < 0.5 * losses[0][name], (name, losses[0][name], losses[-1][name])


def test_train_step_steps_once_per_gradient_accumulation() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = veloxseg.create_model("veloxseg_tiny", **SMALL_ROI)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=4)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = {"image": torch.randn(1, 2, 64, 64, 64), "label": (torch.rand(1, 1, 64, 64, 64) > 0.9).float()}
    before = [p.detach().clone() for p in model.parameters()]

    terms = train_step(model, batch, VeloxSegLoss(), optimizer, scheduler, accelerator)
    assert set(terms) == {"loss", "seg", "rc", "sdkt"} and not terms["loss"].requires_grad
    assert not accelerator.sync_gradients and scheduler.last_epoch == 0  # accumulating: no step yet
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    train_step(model, batch, VeloxSegLoss(), optimizer, scheduler, accelerator)
    assert accelerator.sync_gradients and scheduler.last_epoch == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_step_drops_modality_groups_per_sample() -> None:
    """--modality-dropout: each sample's forward gets its own random subset; the paper loss (teachers
    reconstructing every group, the dropped ones included) still trains every stream."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = veloxseg.create_model("veloxseg_tiny", group_channels=[1, 1, 1], **SMALL_ROI)
    seen = []
    model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs.get("present")), with_kwargs=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, total_iters=4)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = {"image": torch.randn(4, 3, 64, 64, 64), "label": (torch.rand(4, 1, 64, 64, 64) > 0.9).float()}
    for _ in range(2):
        terms = train_step(model, batch, VeloxSegLoss(), optimizer, scheduler, accelerator, modality_dropout=1.0)
        assert torch.isfinite(terms["loss"])
    masks = torch.cat(seen)
    assert masks.shape == (8, 3) and masks.any(1).all() and not masks.all(1).any()  # proper, non-empty
    assert len({tuple(m) for m in masks.tolist()}) > 1  # drawn per sample
    train_step(
        model, batch, VeloxSegLoss(), optimizer, scheduler, accelerator, modality_dropout=1.0,
        modality_dropout_mode="per-group",
    )  # fmt: skip
    assert (seen[-1].sum(1) == 1).all()  # per-group at p = 1: every group lost, one kept back
    train_step(model, batch, VeloxSegLoss(), optimizer, scheduler, accelerator)
    assert seen[-1] is None  # without the flag: the plain network (no mask passed)


def test_modality_consistency_distils_the_full_view_into_the_dropped_ones() -> None:
    """The consistency term: 0 without a dropped sample, > 0 with one, and its gradient reaches the model
    through the dropped view only (the full view is a teacher without gradient); train_step adds it."""
    torch.manual_seed(0)
    no_dropout = dict(attn_drop=0.0, proj_drop=0.0, conv_drop=0.0, drop_path_rate=0.0)
    model = veloxseg.create_model("veloxseg_tiny", group_channels=[1, 1], **no_dropout, **SMALL_ROI).train()
    x = torch.randn(2, 2, 64, 64, 64)
    mask = torch.tensor([[True, True], [True, False]])
    logits = model(x, present=mask).logits[0]
    assert modality_consistency_term(model, x, logits, torch.ones(2, 2, dtype=torch.bool)) == 0
    term = modality_consistency_term(model, x, logits, mask)
    assert term > 0 and term.requires_grad
    (grad,) = torch.autograd.grad(term, logits)
    assert grad[0].abs().sum() == 0 and grad[1].abs().sum() > 0  # only the sample that lost a group
    teacher = model(x[1:]).logits[0].log_softmax(1)
    expected = (teacher.exp() * (teacher - logits[1:].log_softmax(1))).sum(1).mean()
    torch.testing.assert_close(term, expected)

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, total_iters=4)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = {"image": x, "label": (torch.rand(2, 1, 64, 64, 64) > 0.9).float()}
    step = dict(modality_dropout=1.0, modality_consistency=2.0)
    seg_only = VeloxSegLoss(rc_weight=0.0, sdkt_weight=0.0)
    terms = train_step(model, batch, seg_only, optimizer, scheduler, accelerator, **step)
    torch.testing.assert_close(terms["loss"], terms["seg"] + 2.0 * terms["consistency"])
    assert terms["consistency"] > 0
    assert "consistency" not in train_step(model, batch, VeloxSegLoss(), optimizer, scheduler, accelerator)


def test_modality_dropout_starts_after_its_warmup(demo_data: Path, tmp_path: Path) -> None:
    """--modality-dropout-warmup: the first share of the steps trains on every group, the rest with dropout."""
    assert [modality_dropout_at(0.5, 0.25, p) for p in (0.0, 0.2, 0.25, 0.9)] == [0.0, 0.0, 0.5, 0.5]
    assert modality_dropout_at(0.5, 0.0, 0.0) == 0.5
    seen = []
    original = veloxseg.training.loop.train_step

    def spy(*args: Any) -> dict[str, torch.Tensor]:
        seen.append(args[9])  # modality_dropout
        return original(*args)

    with mock.patch.object(veloxseg.training.loop, "train_step", spy):
        run(
            data=str(demo_data), output_dir=str(tmp_path / "warm"), max_steps=4, modality_dropout=0.5,
            modality_dropout_warmup=0.5, modality_consistency=1.0,
        )  # fmt: skip
    assert seen == [0.0, 0.0, 0.5, 0.5]
    recorded = json.loads((tmp_path / "warm" / "train_config.json").read_text())
    assert recorded["modality_dropout_warmup"] == 0.5 and recorded["modality_consistency"] == 1.0


def test_modality_dropout_is_recorded_and_refused_for_one_channel(demo_data: Path, tmp_path: Path) -> None:
    result = run(
        data=str(demo_data), output_dir=str(tmp_path / "anymod"), max_steps=2, modality_dropout=0.5,
        modality_dropout_mode="per-group",
    )  # fmt: skip
    recorded = json.loads((result.output_dir / "train_config.json").read_text())
    assert recorded["modality_dropout"] == 0.5 and recorded["modality_dropout_mode"] == "per-group"
    saved = json.loads((result.output_dir / "config.json").read_text())["pretrained_cfg"]["veloxseg"]
    assert saved["modality_dropout"] == 0.5 and saved["modality_dropout_mode"] == "per-group"
    card = (result.output_dir / "README.md").read_text()
    assert "Trained with modality dropout 0.5 (per-group): segments any non-empty subset of CT, PET" in card
    one_channel = tmp_path / "one"
    shutil.copytree(demo_data, one_channel)
    meta = json.loads((one_channel / "dataset.json").read_text())
    meta["channel_names"] = {"0": meta["channel_names"]["0"]}
    (one_channel / "dataset.json").write_text(json.dumps(meta))
    for path in (one_channel / "imagesTr").glob("*_0001.nii.gz"):
        path.unlink()
    with pytest.raises(ValueError, match="modality_dropout needs 2 or more modality groups .* leave --modality"):
        run(data=str(one_channel), output_dir=str(tmp_path / "one-out"), modality_dropout=0.5)
    assert not (tmp_path / "one-out").exists()


def test_recipes_set_the_loss_the_model_parts_and_the_learning_rate(demo_data: Path) -> None:
    from veloxseg.data.datasets import read_dataset

    spec = read_dataset(demo_data)
    default = resolve(TrainConfig(data=str(demo_data), roi=64))
    assert default.model == "veloxseg_small_hr" and default.lr == RECIPES["default"].lr
    assert (default.seg_weight, default.rc_weight, default.sdkt_weight) == (1.0, 0.0, 0.0)
    assert default.max_grad_norm == 1.0
    model = build_model(default, spec)
    assert model.teachers is None and model.decoder.aux_heads is None
    assert model.config.attn_drop == model.config.proj_drop == model.config.conv_drop == 0.0

    paper = resolve(TrainConfig(data=str(demo_data), roi=64, recipe="paper", model="veloxseg_small"))
    assert paper.lr == 2.5e-4 and (paper.seg_weight, paper.rc_weight, paper.sdkt_weight) == (1.0, 0.5, 2.0)
    assert paper.max_grad_norm is None
    model = build_model(paper, spec)
    assert model.teachers is not None and model.decoder.aux_heads is not None and model.config.conv_drop == 0.1
    # one flag still overrides one setting of a recipe
    assert resolve(TrainConfig(data=str(demo_data), roi=64, sdkt_weight=1.0)).sdkt_weight == 1.0
    with pytest.raises(ValueError, match="unknown recipe 'papr'"):
        resolve(TrainConfig(data=str(demo_data), recipe="papr"))


def test_default_recipe_starts_the_head_small_with_the_class_prior(demo_data: Path) -> None:
    import argparse

    from veloxseg.data.datasets import read_dataset
    from veloxseg.training.config import add_train_arguments, config_from_args

    spec = read_dataset(demo_data)
    config = resolve(TrainConfig(data=str(demo_data), roi=64))
    assert (config.head_init_scale, config.head_class_prior) == (0.1, True)
    train_cases = spec.training[:3]
    torch.manual_seed(0)
    head = build_model(config, spec, train_cases).decoder.head
    torch.manual_seed(0)
    spec_init = build_model(dataclasses.replace(config, head_init_scale=1.0, head_class_prior=False), spec).decoder.head
    torch.testing.assert_close(head.weight, 0.1 * spec_init.weight)
    assert not spec_init.bias.any()
    # the bias: log share of each class among the voxels of the training cases' labels, 2^3 sub-voxels per class
    labels = np.concatenate([np.asarray(nib.load(c.label).dataobj).ravel() for c in train_cases]).astype(int)
    shares = np.bincount(labels, minlength=len(spec.labels)) / labels.size
    expected = torch.tensor(np.log(np.maximum(shares, 1e-4)), dtype=torch.float32).repeat_interleave(8)
    torch.testing.assert_close(head.bias, expected)
    assert head.bias[0] > head.bias[8]  # background, the commonest class, starts the most likely

    paper = resolve(TrainConfig(data=str(demo_data), roi=64, recipe="paper"))
    assert (paper.head_init_scale, paper.head_class_prior) == (1.0, False)
    finetune = resolve(TrainConfig(data=str(demo_data), stage="finetune"))
    assert (finetune.head_init_scale, finetune.head_class_prior) == (None, False)
    assert resolve(TrainConfig(data=str(demo_data), stage="pretrain")).head_class_prior is False  # no labels needed
    assert resolve(config) == config  # resolving twice changes nothing
    with pytest.raises(ValueError, match="head_init_scale must be > 0"):
        resolve(TrainConfig(data=str(demo_data), head_init_scale=0.0))
    for setting in (dict(head_init_scale=0.1), dict(head_class_prior=True)):
        with pytest.raises(ValueError, match="does not go with pretrained weights"):
            resolve(TrainConfig(data=str(demo_data), stage="finetune", **setting))
    with pytest.raises(ValueError, match="head_class_prior needs the labels"):
        resolve(TrainConfig(data=str(demo_data), stage="pretrain", head_class_prior=True))
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    assert config_from_args(parser.parse_args([])).head_class_prior is None
    assert config_from_args(parser.parse_args(["--no-head-class-prior"])).head_class_prior is False
    assert resolve(config_from_args(parser.parse_args(["--no-head-class-prior"]))).head_class_prior is False


def test_class_frequencies_count_label_voxels_and_name_a_bad_label(tmp_path: Path) -> None:
    from veloxseg.data import Case, class_frequencies

    def label(name: str, values: np.ndarray) -> Path:
        path = tmp_path / name
        nib.save(nib.Nifti1Image(values.astype(np.uint8), np.eye(4)), path)
        return path

    a = label("a.nii.gz", np.array([0, 0, 0, 1, 1, 2]).reshape(1, 2, 3))
    b = label("b.nii.gz", np.zeros((1, 1, 2)))
    shares = class_frequencies([Case("a", (), a), Case("b", (), b)], 4)
    np.testing.assert_allclose(shares, [5 / 8, 2 / 8, 1 / 8, 0.0])
    with pytest.raises(ValueError, match=r"c: label values \[3\] are not classes 0..2"):
        class_frequencies([Case("c", (), label("c.nii.gz", np.array([[[0, 3]]])))], 3)
    with pytest.raises(ValueError, match="d: no label"):
        class_frequencies([Case("d", ())], 3)


class NormRecordingSGD(torch.optim.SGD):
    """SGD that records the global gradient norm it steps with (train_step zeroes the gradients after)."""

    def step(self, closure=None):  # noqa: ANN001, ANN201
        grads = [p.grad.flatten() for group in self.param_groups for p in group["params"]]
        self.norm = torch.linalg.vector_norm(torch.cat(grads))
        return super().step(closure)


class PlainSegmenter(torch.nn.Conv3d):
    def forward(self, x: torch.Tensor) -> VeloxSegOutput:
        return VeloxSegOutput([super().forward(x)])


def test_train_step_clips_the_gradient_norm() -> None:
    accelerator = Accelerator(cpu=True)
    batch = {"image": torch.randn(1, 1, 4, 4, 4) * 10, "label": (torch.rand(1, 1, 4, 4, 4) > 0.5).float()}
    norms = {}
    for max_norm in (None, 0.01):
        torch.manual_seed(0)
        model = PlainSegmenter(1, 2, 1)
        optimizer = NormRecordingSGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        train_step(model, batch, VeloxSegLoss(1.0, 0.0, 0.0), optimizer, scheduler, accelerator, max_grad_norm=max_norm)
        norms[max_norm] = optimizer.norm
    assert norms[None] > 0.01 and norms[0.01] == pytest.approx(0.01, rel=1e-3)


# Whole runs


def test_pretrain_then_segment_then_finetune(demo_data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    # pretrain: the student decoder is frozen, the teachers learn
    pretrain = tmp_path / "pretrain"
    run(
        stage="pretrain", data=str(demo_data), output_dir=str(pretrain), max_steps=2, checkpoint_every=1, mask_ratio=0.5
    )
    first, last = (tensors(pretrain / "checkpoints" / f"step_{s:08d}") for s in (1, 2))
    assert all(torch.equal(first[k], last[k]) for k in first if k.startswith("decoder."))
    assert any(not torch.equal(first[k], last[k]) for k in first if k.startswith("teachers."))
    assert "val/dice" not in records(pretrain)[-1]

    # segment with the paper's recipe from the pretrained teachers, one-way distillation, bf16 autocast on the CPU
    segment = tmp_path / "segment"
    result = run(
        data=str(demo_data), output_dir=str(segment), model=f"local-dir:{pretrain}", pretrained=True,
        recipe="paper", one_way_sdkt=True, max_steps=2, mixed_precision="bf16",
        command="python examples/train.py --test",
    )  # fmt: skip
    assert result.step == 2 and 0.0 <= result.metrics["val/dice"] <= 1.0
    assert {"val/dice", "val/dice_lesion", "val/hd95"} <= set(records(segment)[-1])
    assert {"train/seg", "train/rc", "train/sdkt", "train/lr", "train/patches_per_s"} <= set(records(segment)[0])
    for png in ("curves.png", "validation.png"):
        assert (segment / png).read_bytes().startswith(b"\x89PNG")
    model = veloxseg.create_model(f"local-dir:{segment}", pretrained=True)
    assert model.config.roi_size == (64, 64, 64) and model.config.group_channels == (1, 1)
    metadata = model.pretrained_cfg["veloxseg"]
    assert [c["name"] for c in metadata["channels"]] == ["CT", "PET"]
    assert metadata["channels"][0]["normalisation"] == "ct" and metadata["labels"] == {"background": 0, "lesion": 1}
    assert metadata["metrics"]["val_dice"] == pytest.approx(result.metrics["val/dice"])
    card = (segment / "README.md").read_text()
    assert "python examples/train.py --test" in card
    assert (segment / "best" / "model.safetensors").is_file()
    run_config = json.loads((segment / "train_config.json").read_text())
    assert (run_config["mixed_precision"], run_config["world_size"], run_config["device"]) == ("bf16", 1, "cpu")
    assert run_config["base_model"] == f"local-dir:{pretrain}" and metadata["license"] == "other"
    assert "segment: world size 1, device cpu, mixed precision bf16" in capsys.readouterr().out

    # finetune onto a one-channel (PET only), three-class dataset
    other = tmp_path / "pet_only"
    shutil.copytree(demo_data, other)
    for pet in list((other / "imagesTr").glob("*_0001.nii.gz")):
        pet.replace(pet.with_name(pet.name.removesuffix("_0001.nii.gz") + "_0000.nii.gz"))
    meta = json.loads((other / "dataset.json").read_text())
    meta.update(channel_names={"0": "PET"}, labels={"background": 0, "lesion": 1, "organ": 2})
    (other / "dataset.json").write_text(json.dumps(meta))
    finetune = tmp_path / "finetune"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what accelerate launch --mixed_precision bf16 sets
    run(
        stage="finetune", data=str(other), output_dir=str(finetune), model=f"local-dir:{segment}", max_steps=1,
        license="cc-by-4.0",
    )
    run_config = json.loads((finetune / "train_config.json").read_text())
    assert run_config["mixed_precision"] == "bf16" and run_config["base_model"] == f"local-dir:{segment}"
    card = (finetune / "README.md").read_text()
    assert f"Fine-tuned from `local-dir:{segment}`" in card and "license: cc-by-4.0" in card
    model = veloxseg.create_model(f"local-dir:{finetune}", pretrained=True)
    assert model.config.group_channels == (1,) and model.config.n_classes == 3
    weights = tensors(finetune)
    assert "attention.patch_embeds.1.weight" not in weights and weights["decoder.head.weight"].shape[0] == 4**3 * 3


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No data given: the trainer makes the demo dataset (a small one here) in cache_dir, once.
    monkeypatch.setattr(veloxseg.training.data, "make_demo_dataset", small_demo)
    common = dict(max_steps=6, checkpoint_every=3, cache_dir=str(tmp_path / "cache"))
    straight = tmp_path / "straight"
    run(output_dir=str(straight), **common)
    assert (tmp_path / "cache" / "demo" / "dataset.json").is_file()

    # Killed while writing the step-6 checkpoint: steps 4-6 are logged, their checkpoint half-written.
    real_save_state = Accelerator.save_state

    def killed_save_state(self: Accelerator, output_dir: str, **kwargs) -> None:
        real_save_state(self, output_dir, **kwargs)
        if output_dir.endswith("step_00000006"):
            (Path(output_dir) / "model.safetensors").write_bytes(b"truncated")
            raise KeyError("killed")  # not an error train() could catch and handle

    # The interrupted run loads its data in two worker processes: per-sample seeds make that no difference.
    interrupted = tmp_path / "interrupted"
    common.update(num_workers=2)
    monkeypatch.setattr(Accelerator, "save_state", killed_save_state)
    with pytest.raises(KeyError, match="killed"):
        run(output_dir=str(interrupted), **common)
    monkeypatch.setattr(Accelerator, "save_state", real_save_state)
    checkpoints = interrupted / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-step_00000006", "step_00000003"]
    assert not (interrupted / "model.safetensors").exists()
    assert latest_checkpoint(checkpoints).name == "step_00000003"

    real_loss = VeloxSegLoss.forward
    losses_computed = []

    def counted_loss(self: VeloxSegLoss, *args, **kwargs) -> dict:
        losses_computed.append(1)
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(VeloxSegLoss, "forward", counted_loss)
    with pytest.raises(ValueError, match="--max-steps 6 -> 8"):
        run(output_dir=str(interrupted), resume=True, **{**common, "max_steps": 8})
    result = run(output_dir=str(interrupted), resume=True, **common)
    assert result.step == 6 and len(losses_computed) == 3  # steps 4-6 only: it did resume
    a, b = tensors(straight), tensors(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop_speed = [{k: v for k, v in r.items() if k != "train/patches_per_s"} for r in records(straight)]
    assert drop_speed == [{k: v for k, v in r.items() if k != "train/patches_per_s"} for r in records(interrupted)]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000003", "step_00000006"]


def test_latest_checkpoint_skips_incomplete_folders(tmp_path: Path) -> None:
    for name, complete in (("step_00000003", True), ("step_00000010", False), (".tmp-step_00000020", True)):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / TRAINER_STATE).write_text("{}")
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_refuses_to_overwrite_an_earlier_run(tmp_path: Path) -> None:
    (tmp_path / "a" / "checkpoints" / "step_00000003").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{}")
    for output_dir in ("a", "b"):
        with pytest.raises(FileExistsError, match="pass resume"):
            run(output_dir=str(tmp_path / output_dir))


# Data checks before training


def _drop_pet(root: Path) -> None:
    next((root / "imagesTr").glob("*_0001.nii.gz")).unlink()


def _bad_label(root: Path) -> None:
    path = next((root / "labelsTr").glob("*.nii.gz"))
    img = nib.load(path)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(data, img.affine), path)


def _gap_in_labels(root: Path) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "lesion": 1, "metastasis": 3}
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_drop_pet, r"missing channel 1 \(PET\) file"),
        (_bad_label, r"has values \[3\] not in dataset.json labels"),
        (_gap_in_labels, r"labels must be the values 0..N-1"),
    ],
)
def test_bad_datasets_are_rejected_before_training(demo_data: Path, tmp_path: Path, corrupt, message: str) -> None:
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    corrupt(data)
    with pytest.raises(DatasetError, match=message):
        run(data=str(data), output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(stage="pretrain", seg_weight=1.0), "self-supervised"),
        (dict(batch_size=3, crops_per_volume=2), "must divide batch_size"),
        (dict(max_steps=5, epochs=2), "not both"),
        (dict(roi=(64, 64)), "1 or 3 sizes"),
        (dict(mixed_precision="fp16", cpu=True), "fp16 needs a CUDA GPU"),
        (dict(hf_dataset="some/dataset"), "hf_image_columns"),
        (dict(hf_dataset="some/dataset", data="some/folder"), "not both"),
        (dict(modality_dropout=1.5), r"modality_dropout must be in \[0, 1\]"),
        (dict(modality_dropout_mode="per_group"), "modality_dropout_mode 'per_group'; use one of uniform, per-group"),
        (dict(modality_dropout_warmup=1.0), r"modality_dropout_warmup must be in \[0, 1\), got 1.0"),
        (dict(modality_consistency=-1.0), "modality_consistency must be >= 0, got -1.0"),
    ],
)
def test_bad_settings_are_rejected(tmp_path: Path, settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run(output_dir=str(tmp_path), **settings)


def test_hugging_face_dataset(demo_data: Path, tmp_path: Path) -> None:
    from datasets import Dataset

    cases = sorted(p.name[: -len(".nii.gz")] for p in (demo_data / "labelsTr").iterdir())
    columns = {
        "ct": [str(demo_data / "imagesTr" / f"{c}_0000.nii.gz") for c in cases],
        "pet": [str(demo_data / "imagesTr" / f"{c}_0001.nii.gz") for c in cases],
        "mask": [str(demo_data / "labelsTr" / f"{c}.nii.gz") for c in cases],
    }
    Dataset.from_dict(columns).save_to_disk(tmp_path / "hf")
    result = run(
        hf_dataset=str(tmp_path / "hf"), hf_image_columns=("ct", "pet"), hf_label_column="mask",
        hf_labels={"background": 0, "lesion": 1}, output_dir=str(tmp_path / "out"), max_steps=1,
    )  # fmt: skip
    assert "val/dice" in result.metrics
    converted = json.loads(next((tmp_path / "out" / "data" / "hf").glob("*/dataset.json")).read_text())
    assert converted["channel_names"] == {"0": "ct", "1": "pet"}


def run_script(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """Run examples/train.py in this process (no second torch import); returns its exit code."""
    monkeypatch.setattr(sys, "argv", ["examples/train.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "examples" / "train.py"), run_name="__main__")
    return exit_info.value.code


def test_command_line_help_documents_the_flags(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    assert run_script(monkeypatch, "--help") == 0
    out = capsys.readouterr().out
    for flag in (
        "--model", "--pretrained", "--data", "--stage", "--max-steps", "--epochs", "--batch-size", "--roi",
        "--lr", "--output-dir", "--resume", "--mixed-precision", "--seed", "--hf-dataset", "--one-way-sdkt",
    ):  # fmt: skip
        assert flag in out, flag
    assert "{pretrain,segment,finetune}" in out


def test_command_line_reports_bad_data_without_a_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    code = run_script(monkeypatch, "--data", str(tmp_path), "--output-dir", str(tmp_path / "out"))
    assert "error:" in code and "dataset.json not found" in code  # sys.exit(message): printed, exit status 1
