"""Running on a subset of the modality groups: the model's ``present``, its errors, and modality dropout masks."""

import pytest
import timm
import torch

import veloxseg
from veloxseg.metadata import ChannelInfo, ModelMetadata
from veloxseg.modalities import random_modality_mask, resolve_present

from .conftest import SMALL_ROI

NO_DROPOUT = dict(attn_drop=0.0, proj_drop=0.0, conv_drop=0.0)


@pytest.fixture(scope="module")
def model() -> veloxseg.VeloxSeg:
    """Three single-channel groups named T1, T2, FLAIR, with the detail path (it reads the input too)."""
    torch.manual_seed(3)
    model = veloxseg.create_model("veloxseg_tiny", group_channels=[1, 1, 1], detail_ch=4, **NO_DROPOUT, **SMALL_ROI)
    names = ["T1", "T2", "FLAIR"]
    model.pretrained_cfg["veloxseg"] = ModelMetadata(
        channels=[ChannelInfo(name=n, group=g) for g, n in enumerate(names)],
        labels={"background": 0, "lesion": 1},
    ).to_dict()
    return model.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, *SMALL_ROI["roi_size"])


@torch.no_grad()
def test_every_group_present_is_the_plain_network_bit_for_bit(model, x):
    plain = model(x)
    for present in (["T1", "T2", "FLAIR"], [0, 1, 2], torch.ones(3, dtype=torch.bool), torch.ones(2, 3).bool()):
        assert torch.equal(model(x, present=present), plain)


@torch.no_grad()
def test_a_subset_ignores_the_missing_channels_and_takes_a_compact_input(model, x):
    subset = model(x, present=["T1", "FLAIR"])
    assert not torch.allclose(subset, model(x))
    garbage = x.clone()
    garbage[:, 1] = float("nan")
    assert torch.equal(model(garbage, present=[0, 2]), subset)
    assert torch.equal(model(x[:, [0, 2]], present=["FLAIR", "T1"]), subset)  # channels in group order
    assert torch.equal(model(x, present=torch.tensor([True, False, True])), subset)


@torch.no_grad()
def test_a_missing_groups_stream_does_not_run(model, x):
    calls = []
    stream = model.attention
    skipped = [stream.patch_embeds[1], stream.merges[0][1], stream.levels[0][0].ffns[1], stream.levels[1][0].norms[1]]
    for module in skipped:
        module.register_forward_pre_hook(lambda *_: calls.append(1))
    model(x, present=["T1", "FLAIR"])
    assert calls == []
    model(x[:1])
    assert len(calls) == len(skipped)
    for module in skipped:
        module._forward_pre_hooks.clear()


@pytest.mark.parametrize("training", [False, True])
def test_per_sample_masks_equal_each_sample_run_alone(model, x, training):
    """A batch mixing subsets computes, for each sample, what that sample alone with its subset does:
    what the trainer's modality dropout trains is what inference on a subset runs."""
    masks = torch.tensor([[True, False, True], [False, True, False]])
    model.train(training)
    try:
        with torch.no_grad():
            batch = model(x, present=masks)
            alone = [model(x[i : i + 1], present=masks[i]) for i in range(2)]
    finally:
        model.eval()
    if training:
        batch, alone = batch.logits[0], [out.logits[0] for out in alone]
        # The teachers of missing groups still reconstruct them, from what the other groups give.
    torch.testing.assert_close(batch, torch.cat(alone), rtol=1e-4, atol=1e-4)


def test_training_with_masks_backpropagates_into_the_present_streams_only():
    model = veloxseg.create_model("veloxseg_tiny", group_channels=[1, 1], **SMALL_ROI).train()
    out = model(torch.randn(2, 2, *SMALL_ROI["roi_size"]), present=torch.tensor([[True, False], [True, False]]))
    out.logits[0].square().mean().backward()
    assert model.attention.patch_embeds[0].weight.grad.abs().sum() > 0
    assert model.attention.patch_embeds[1].weight.grad is None
    assert model.attention.levels[0][0].attn.qkv[1].weight.grad is None


@torch.no_grad()
def test_present_through_timm():
    torch.manual_seed(0)
    model = timm.create_model("veloxseg_tiny", **SMALL_ROI).eval()
    x = torch.randn(1, 2, *SMALL_ROI["roi_size"])
    assert torch.equal(model(x, present=["group1_channel0"]), model(x[:, 1:], present=[1]))
    features = model.forward_intermediates(x, present=[1], intermediates_only=True)
    assert torch.equal(features[-1], model.forward_intermediates(x[:, 1:], present=[1], intermediates_only=True)[-1])


@pytest.mark.parametrize(
    "present, message",
    [
        (["flair"], "unknown channel 'flair' (did you mean 'FLAIR'?)"),
        ([3], "group index 3 is out of range for 3 groups"),
        ([], "names no modality group"),
        ([True], "channel names or group indices, got True"),
        (torch.tensor([False, False, False]), "sample(s) [0, 1] with no modality group"),
        (torch.tensor([[True, False, False], [False, False, False]]), "sample(s) [1] with no modality group"),
        (torch.ones(3), "must be bool of shape (3,) or (batch=2, 3)"),
        (torch.ones(1, 3, dtype=torch.bool)[:, :2], "must be bool of shape (3,) or (batch=2, 3)"),
    ],
)
def test_bad_present_is_named(model, x, present, message):
    with pytest.raises(ValueError) as error:
        model(x, present=present)
    assert message in str(error.value)


def test_partly_named_group_and_wrong_compact_channels_are_refused():
    model = veloxseg.create_model("veloxseg_tiny", group_channels=[2, 1], **SMALL_ROI).eval()
    with pytest.raises(ValueError, match=r"only \['group0_channel0'\] of modality group 0's channels"):
        model(torch.randn(1, 3, *SMALL_ROI["roi_size"]), present=["group0_channel0"])
    with pytest.raises(ValueError, match="expects 3 input channels .* only theirs, got 2"):
        model(torch.randn(1, 2, *SMALL_ROI["roi_size"]), present=[1])
    assert resolve_present(["group0_channel0", "group0_channel1"], model.group_channel_names(), 2) == (0,)
    assert resolve_present(torch.tensor([[True, False], [True, False]]), model.group_channel_names(), 2) == (0,)
    assert resolve_present([0, "group1_channel0"], model.group_channel_names(), 2) is None


def test_modality_dropout_masks_are_uniform_over_the_proper_subsets():
    generator = torch.Generator().manual_seed(0)
    masks = random_modality_mask(14_000, 3, 1.0, generator)
    counts = torch.unique(masks, dim=0, return_counts=True)
    subsets = [tuple(row) for row in counts[0].int().tolist()]
    assert (1, 1, 1) not in subsets and (0, 0, 0) not in subsets and len(subsets) == 6
    assert counts[1].min() > 14_000 / 6 * 0.9 and counts[1].max() < 14_000 / 6 * 1.1  # ~5 sigma
    kept = random_modality_mask(10_000, 2, 0.3, generator).all(1).float().mean()
    assert abs(kept - 0.7) < 0.03
    assert random_modality_mask(50, 4, 0.0, generator).all()
    with pytest.raises(ValueError, match="2 or more modality groups, this one has 1"):
        random_modality_mask(2, 1, 0.5)


def test_per_group_modality_dropout_drops_each_group_on_its_own_coin():
    generator = torch.Generator().manual_seed(0)
    masks = random_modality_mask(20_000, 3, 0.5, generator, mode="per-group")
    assert masks.any(1).all()  # a sample that lost every group keeps one
    assert abs(masks.all(1).float().mean() - 0.5**3) < 0.01  # the full set: (1 - p)^G
    single = masks.sum(1) == 1  # 3 p^2 (1 - p) drawn, plus the p^3 all-dropped draws rescued
    assert abs(single.float().mean() - 0.5) < 0.015
    assert abs(masks[single].float().mean(0) - 1 / 3).max() < 0.02  # the kept group: any of the three
    assert random_modality_mask(50, 4, 0.0, generator, mode="per-group").all()
    with pytest.raises(ValueError, match="mode must be one of .*'uniform', 'per-group'.*got 'per_group'"):
        random_modality_mask(2, 3, 0.5, mode="per_group")


def test_modality_dropout_travels_in_the_metadata_and_on_the_card(model):
    """P and mode in the metadata, on the card with the groups; a file without the mode (older) still loads
    and says so; a file without modality dropout says nothing of subsets."""
    from veloxseg.card import model_card

    metadata = veloxseg.metadata.model_metadata(model)
    assert metadata.modality_dropout_mode == "" and metadata.subset_training() == ""  # older file: none recorded
    assert "modality_dropout_mode" not in metadata.to_dict()  # and none written: config.json files stay as they are
    assert "Trained with modality dropout" not in str(model_card(model, metadata, "veloxseg_tiny"))
    grouped = ModelMetadata.from_dict(
        {**metadata.to_dict(), "modality_dropout": 0.5, "modality_dropout_mode": "per-group"}
    )
    assert ModelMetadata.from_dict(grouped.to_dict()) == grouped
    card = str(model_card(model, grouped, "veloxseg_tiny"))
    assert "Trained with modality dropout 0.5 (per-group): segments any non-empty subset of T1, T2, FLAIR" in card
    assert "Per-group: each modality group" in card
    older = ModelMetadata.from_dict({**metadata.to_dict(), "modality_dropout": 0.5})
    assert "Trained with modality dropout 0.5 (mode not recorded): segments" in str(model_card(model, older, "x"))
    with pytest.raises(ValueError, match="modality_dropout_mode must be one of .* got 'per_group'"):
        ModelMetadata.from_dict({**metadata.to_dict(), "modality_dropout_mode": "per_group"})
    with pytest.raises(ValueError, match="modality_dropout must be a share in \\[0, 1\\], got 2"):
        ModelMetadata.from_dict({**metadata.to_dict(), "modality_dropout": 2})
