"""Adapting pretrained weights to other channels, groups, classes and ROI sizes (veloxseg.adapt)."""

import logging
import re

import pytest
import torch

import veloxseg
from veloxseg.adapt import adapt_state_dict

from .conftest import SMALL_ROI

HEADS = re.compile(r"decoder\.(head|aux_heads\.\d)\.")


@pytest.fixture(scope="module")
def small() -> veloxseg.VeloxSeg:
    """veloxseg_small on PET/CT-like input: two single-channel groups, 2 classes."""
    torch.manual_seed(1)
    return veloxseg.create_model("veloxseg_small", **SMALL_ROI)


def source_name(key: str, source_groups: int) -> str:
    """Group g of the model reads group g % source_groups of the pretrained weights."""
    pattern = r"(patch_embeds|norms|qkv|projs|ffns|merges\.\d+|^teachers)\.(\d+)\."
    return re.sub(pattern, lambda m: f"{m.group(1)}.{int(m.group(2)) % source_groups}.", key)


def adapt(source: veloxseg.VeloxSeg, name: str = "veloxseg_small", **overrides):
    model = veloxseg.create_model(name, **overrides)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    state, report = adapt_state_dict(source.state_dict(), source.config, model)
    model.load_state_dict(state, strict=True)
    return model, init, report


@pytest.mark.parametrize("group_channels, n_classes", [([4], 4), ([1, 1, 1], 5)])
def test_other_groups_and_classes_keep_every_compatible_tensor(small, group_channels, n_classes):
    model, init, report = adapt(small, group_channels=group_channels, n_classes=n_classes, **SMALL_ROI)
    source, target = small.state_dict(), model.state_dict()
    src_groups, groups = len(small.config.group_channels), len(group_channels)
    changed = {"encoder.downs.0.weight", *(f"encoder.mixers.{i}.weight" for i in range(4))}
    changed |= {k for k in target if re.match(r"attention\.patch_embeds\.\d\.weight|teachers\.\d\.head\.", k)}
    if group_channels == [1, 1, 1]:  # one channel per group as before: stems of the groups unchanged
        changed -= {k for k in changed if k.startswith(("attention.patch_embeds", "teachers"))}
    for key, value in target.items():
        if HEADS.match(key):
            assert torch.equal(value, init[key]), f"{key} should be re-initialised"
        elif key not in changed:
            assert torch.equal(value, source[source_name(key, src_groups)]), f"{key} was not kept"

    # The adapted tensors, as the module docstring says.
    rescale = src_groups / groups
    blocks = source["encoder.downs.0.weight"].split(1, 1)
    if group_channels == [4]:
        embed = source["attention.patch_embeds.0.weight"]
        assert torch.allclose(target["attention.patch_embeds.0.weight"], embed.repeat(1, 4, 1, 1, 1) / 4)
        assert torch.allclose(target["encoder.downs.0.weight"], blocks[0].repeat(1, 4, 1, 1, 1) / 4 * rescale)
        recon = source["teachers.0.head.weight"]
        assert torch.equal(target["teachers.0.head.weight"], recon.repeat(4, 1, 1, 1, 1))
    else:
        expected = torch.cat([blocks[0], blocks[1], blocks[0]], 1) * rescale
        assert torch.allclose(target["encoder.downs.0.weight"], expected)
    mix = source["encoder.mixers.2.weight"].chunk(src_groups, 1)
    expected = torch.cat([mix[g % src_groups] for g in range(groups)], 1) * rescale
    assert torch.allclose(target["encoder.mixers.2.weight"], expected)

    assert set(report.reinitialised) == {k for k in target if HEADS.match(k)}
    assert set(report.kept) | set(report.adapted) | set(report.reinitialised) == set(target)
    dropped_groups = {k for k in source if k.startswith("teachers.1.") or ".1." in k and "patch_embeds" in k}
    assert (dropped_groups <= set(report.dropped)) == (groups == 1)
    assert not report.exact

    x = torch.randn(1, sum(group_channels), *SMALL_ROI["roi_size"])
    out = model.train()(x)
    assert [t.shape[1] for t in out.logits] == [n_classes] * 4 and out.reconstruction.shape == x.shape
    with torch.no_grad():
        assert model.eval()(x).shape == (1, n_classes, *SMALL_ROI["roi_size"])


def test_single_channel_stems_sum_the_pretrained_channels():
    source = veloxseg.create_model("veloxseg_tiny", group_channels=[3], **SMALL_ROI)
    model, _, report = adapt(source, "veloxseg_tiny", group_channels=[1], **SMALL_ROI)
    for key in ["attention.patch_embeds.0.weight", "encoder.downs.0.weight"]:
        assert torch.allclose(model.state_dict()[key], source.state_dict()[key].sum(1, keepdim=True))
        assert report.adapted[key].startswith("input channels")


def test_new_roi_keeps_the_shared_window_scales():
    source = veloxseg.create_model("veloxseg_tiny", **SMALL_ROI)
    roi = dict(roi_size=(128, 128, 128), big_windows=SMALL_ROI["big_windows"])  # one more scale per level
    model, init, report = adapt(source, "veloxseg_tiny", **roi)
    assert [len(model.config.level_scales(i)) for i in range(1, 5)] == [5, 3, 3, 2]
    before, after, fresh = source.state_dict(), model.state_dict(), init
    for level in range(4):
        attn_src = source.attention.levels[level][0].attn
        attn = model.attention.levels[level][0].attn
        s1, s2, heads = len(attn_src.scales), len(attn.scales), attn.num_heads
        key = f"attention.levels.{level}.0.attn.qkv.1.weight"
        # [q | k | v] on the out axis, each (scale, head, c)
        sizes = [[a.qk_channels, a.qk_channels, a.v_channels] for a in (attn_src, attn)]
        widths = [[a.qk_head_dim] * 2 + [a.v_head_dim] for a in (attn_src, attn)]
        parts = zip(before[key].split(sizes[0]), after[key].split(sizes[1]), fresh[key].split(sizes[1]), *widths)
        for old, new, new_init, c1, c2 in parts:
            old, new = old.unflatten(0, (s1, heads, c1)), new.unflatten(0, (s2, heads, c2))
            c = min(c1, c2)
            assert torch.equal(new[:s1, :, :c], old[:, :, :c])
            assert torch.equal(new[s1:], new_init.unflatten(0, (s2, heads, c2))[s1:])  # new scales: fresh init
        table = f"attention.levels.{level}.0.attn.relative_position_bias_table"
        assert torch.equal(after[table], before[table])  # same tokens per window
        assert f"attention.levels.{level}.0.attn.projs.0.weight" in report.adapted
    assert "value channels per head 32 -> 16" in report.adapted["attention.levels.3.0.attn.qkv.0.weight"]
    assert not report.reinitialised and not report.dropped
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 2, 128, 128, 128)).shape == (1, 2, 128, 128, 128)


def test_other_window_tokens_resample_the_position_tables():
    source = veloxseg.create_model("veloxseg_tiny", **SMALL_ROI)
    roi = dict(roi_size=(128, 128, 128), big_windows=[[4, 4, 4], [8, 8, 8], [4, 4, 4], [4, 4, 4]])
    model, _, report = adapt(source, "veloxseg_tiny", **roi)
    key = "attention.levels.0.0.attn.relative_position_bias_table"
    old = source.state_dict()[key].T.reshape(-1, 3, 3, 3)  # offsets -1..1 per axis
    new = model.state_dict()[key].T.reshape(-1, 7, 7, 7)  # offsets -3..3
    assert torch.allclose(new[:, ::3, ::3, ::3], old)  # align-corners resampling keeps the grid points
    assert set(report.adapted) == {f"attention.levels.{i}.0.attn.relative_position_bias_table" for i in range(4)}


def test_training_only_modules_follow_the_model(small, caplog):
    with caplog.at_level(logging.INFO, logger="veloxseg.adapt"):
        _, _, report = adapt(small, teachers=False, deep_supervision=False, **SMALL_ROI)
    assert set(report.dropped) == {k for k in small.state_dict() if k.startswith(("teachers.", "decoder.aux_heads."))}
    assert "the model is built without teachers" in report.dropped["teachers.1.head.weight"]
    assert "dropped decoder.aux_heads.0.weight" in caplog.text

    plain = veloxseg.create_model("veloxseg_tiny", teachers=False, deep_supervision=False, **SMALL_ROI)
    _, _, report = adapt(plain, "veloxseg_tiny", **SMALL_ROI)
    assert report.reinitialised["teachers.0.head.weight"] == "the pretrained network was built without teachers"
    assert "decoder.aux_heads.2.bias" in report.reinitialised


def test_exact_load_reports_nothing_but_kept(small):
    model, _, report = adapt(small, **SMALL_ROI)
    assert report.exact and report.kept == list(model.state_dict())


@pytest.mark.parametrize(
    "overrides, message",
    [(dict(base_ch=32), r"base_ch 16 -> 32"), (dict(depths=(2, 1, 1, 1)), r"depths \(1, 1, 1, 1\) -> \(2, 1, 1, 1\)")],
)
def test_structural_changes_are_errors(small, overrides, message):
    model = veloxseg.create_model("veloxseg_small", **SMALL_ROI, **overrides)
    with pytest.raises(ValueError, match=message):
        adapt_state_dict(small.state_dict(), small.config, model)


def test_weights_that_do_not_fit_their_config_are_errors(small):
    state = dict(small.state_dict())
    del state["encoder.mixers.1.bias"]
    state["decoder.head.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"missing encoder\.mixers\.1\.bias.*decoder\.head\.bias has shape \(3,\)"):
        adapt_state_dict(state, small.config, small)
