"""The recommended variant veloxseg_small_hr: veloxseg_small plus a half-resolution detail path."""

import pytest
import torch

import veloxseg
from veloxseg import adapt_state_dict
from veloxseg.layers import DetailPath

ROI = dict(roi_size=(64, 64, 64), big_windows=[[2, 2, 2], [4, 4, 4], [2, 2, 2], [2, 2, 2]])


def test_untrained_detail_path_leaves_small_unchanged() -> None:
    torch.manual_seed(0)
    hr = veloxseg.create_model("veloxseg_small_hr", **ROI).eval()
    small = veloxseg.create_model("veloxseg_small", **ROI).eval()
    small.load_state_dict({k: v for k, v in hr.state_dict().items() if not k.startswith("decoder.detail.")})
    x = torch.randn(1, 2, 64, 64, 64)
    with torch.no_grad():
        assert torch.equal(hr(x), small(x))
        hr.decoder.detail.out.bias.fill_(0.5)  # a trained path changes the logits
        assert not torch.allclose(hr(x), small(x))


def test_detail_path_shapes_and_gradients() -> None:
    path = DetailPath(in_ch=2, u1_ch=16, width=8, n_classes=3)
    x, u1 = torch.randn(2, 2, 32, 32, 16), torch.randn(2, 16, 8, 8, 4)
    stem = path.stem(x)
    assert stem.shape == (2, 8, 16, 16, 8)
    out = path(stem, u1)
    assert out.shape == (2, 3, 32, 32, 16)
    out.square().sum().backward()
    assert path.out.weight.grad.abs().sum() > 0 and path.stem.weight.grad is not None


def test_hr_trains_and_counts_its_path_in_inference_parameters() -> None:
    model = veloxseg.create_model("veloxseg_small_hr", teachers=False, deep_supervision=False, **ROI).train()
    small = veloxseg.create_model("veloxseg_small", teachers=False, deep_supervision=False, **ROI)
    detail = sum(p.numel() for p in model.decoder.detail.parameters())
    assert model.inference_parameters() == small.inference_parameters() + detail
    out = model(torch.randn(1, 2, 64, 64, 64))
    out.logits[0].mean().backward()
    assert model.decoder.detail.out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("change", [dict(in_ch=[3]), dict(n_classes=4)])
def test_adaptation_fits_the_detail_path(change: dict) -> None:
    source = veloxseg.create_model("veloxseg_small_hr", **ROI)
    target = veloxseg.create_model("veloxseg_small_hr", **{**ROI, **change})
    state, report = adapt_state_dict(source.state_dict(), source.config, target)
    target.load_state_dict(state)
    if "in_ch" in change:
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
