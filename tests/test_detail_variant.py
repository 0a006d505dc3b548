"""The recommended variant veloxseg_small_hr: veloxseg_small plus a half-resolution detail path."""

import pytest
import torch

import veloxseg
from veloxseg import adapt_state_dict
from veloxseg.layers import DetailPath

ROI = dict(roi_size=(64, 64, 64), big_windows=[[2, 2, 2], [4, 4, 4], [2, 2, 2], [2, 2, 2]])


def test_untrained_detail_path_upsamples_the_half_resolution_head() -> None:
    torch.manual_seed(0)
    hr = veloxseg.create_model("veloxseg_small_hr", **ROI).eval()
    assert hr.decoder.head.out_channels == 8 * hr.config.n_classes  # 2^3 sub-blocks, not the paper's 4^3
    x = torch.randn(1, 2, 64, 64, 64)
    with torch.no_grad():
        logits = hr(x)
        half = logits[..., ::2, ::2, ::2]
        assert torch.equal(logits, half.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4))
        assert half.std() > 0
        hr.decoder.detail.out.bias.copy_(torch.arange(16.0))  # a trained path adds per-sub-voxel detail
        detailed = hr(x)
    # output voxel (c, 2d + s1, 2h + s2, 2w + s3) gets bias c * 8 + s1 * 4 + s2 * 2 + s3
    assert torch.allclose(detailed[0, 1, 1, 0, 1] - logits[0, 1, 1, 0, 1], torch.tensor(8.0 + 4 + 1))
    assert torch.allclose(detailed[0, 0, 2, 3, 2] - logits[0, 0, 2, 3, 2], torch.tensor(2.0))


def test_detail_path_shapes_and_gradients() -> None:
    path = DetailPath(in_ch=2, u1_ch=16, width=8, n_classes=3)
    x, u1, coarse = torch.randn(2, 2, 32, 32, 16), torch.randn(2, 16, 8, 8, 4), torch.randn(2, 3, 16, 16, 8)
    coarse.requires_grad_(True)
    stem = path.stem(x)
    assert stem.shape == (2, 8, 16, 16, 8)
    out = path(stem, u1, coarse)
    assert out.shape == (2, 3, 32, 32, 16)
    out.square().sum().backward()
    assert path.out.weight.grad.abs().sum() > 0 and path.stem.weight.grad is not None
    # each half-resolution logit feeds its 2^3 output block
    blocks = out.detach().unflatten(2, (16, 2)).unflatten(4, (16, 2)).unflatten(6, (8, 2))
    assert torch.allclose(coarse.grad, 2 * blocks.sum((3, 5, 7)), atol=1e-5)


def test_hr_trains_and_counts_its_path_in_inference_parameters() -> None:
    model = veloxseg.create_model("veloxseg_small_hr", teachers=False, deep_supervision=False, **ROI).train()
    small = veloxseg.create_model("veloxseg_small", teachers=False, deep_supervision=False, **ROI)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    head_saving = count(small.decoder.head) - count(model.decoder.head)  # 2^3 instead of 4^3 sub-blocks
    assert head_saving == 7 * 8 * 2 * (16 * 27 + 1)
    assert model.inference_parameters() == small.inference_parameters() + count(model.decoder.detail) - head_saving
    out = model(torch.randn(1, 2, 64, 64, 64))
    out.logits[0].mean().backward()
    assert model.decoder.detail.out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("change", [dict(group_channels=[3]), dict(n_classes=4)])
def test_adaptation_fits_the_detail_path(change: dict) -> None:
    source = veloxseg.create_model("veloxseg_small_hr", **ROI)
    target = veloxseg.create_model("veloxseg_small_hr", **{**ROI, **change})
    state, report = adapt_state_dict(source.state_dict(), source.config, target)
    target.load_state_dict(state)
    if "group_channels" in change:
        assert "decoder.detail.stem.weight" in report.adapted
        assert state["decoder.detail.stem.weight"].shape[1] == 3
    else:
        assert "decoder.detail.out.weight" in report.reinitialised


def test_registered_and_recorded_as_its_own_variant() -> None:
    assert "veloxseg_small_hr" in veloxseg.list_models()
    model = veloxseg.create_model("veloxseg_small_hr")
    assert model.config.detail_ch == 8
    with pytest.raises(ValueError, match="detail_ch"):
        veloxseg.create_model("veloxseg_small", detail_ch=-1)
    with pytest.raises(ValueError, match="patch_size 4"):
        veloxseg.create_model("veloxseg_small_hr", patch_size=2)
