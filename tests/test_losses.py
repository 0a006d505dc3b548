"""The fused Dice + CE loss against MONAI's DiceCELoss (value and gradient), its input checks, and the
training process's allocator settings."""

import platform
import subprocess
import sys

import pytest
import torch
from monai.losses import DiceCELoss

from veloxseg.layers.cpu_kernels import cpu_kernels_available
from veloxseg.losses import VeloxSegLoss, _DiceCE, dice_ce_loss
from veloxseg.model import VeloxSegOutput

MONAI_DICE_CE = DiceCELoss(include_background=False, softmax=True, to_onehot_y=True)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 6), (1, 2, 3, 3, 3), (3, 5, 4, 4, 2)])
def test_dice_ce_matches_monai_in_float64(shape):
    torch.manual_seed(0)
    logits = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]))
    labels[0] = labels[0].clamp(max=shape[1] - 2)  # a class absent from a sample: Dice's smoothing terms matter
    fused = dice_ce_loss(logits, labels)
    reference = MONAI_DICE_CE(logits, labels.double())
    (grad_fused,) = torch.autograd.grad(fused, logits)
    (grad_reference,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_fused, grad_reference, rtol=1e-10, atol=1e-14)


def test_dice_ce_gradcheck():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (2, 1, 3, 4, 2))
    assert torch.autograd.gradcheck(lambda z: dice_ce_loss(z, labels), (logits,))


def test_dice_ce_real_shape_float32():
    """The trainer's case: float32 logits of a 2 x 32^3 batch, 3 classes, float labels as loaded."""
    torch.manual_seed(2)
    logits = (3 * torch.randn(2, 3, 32, 32, 32)).requires_grad_()
    labels = torch.randint(0, 3, (2, 1, 32, 32, 32)).float()
    fused, reference = dice_ce_loss(logits, labels), MONAI_DICE_CE(logits, labels)
    (grad_fused,) = torch.autograd.grad(fused * 2.5, logits)  # a non-unit upstream gradient
    (grad_reference,) = torch.autograd.grad(reference * 2.5, logits)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_fused, grad_reference, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("shape", [(2, 2, 5, 3, 7), (1, 4, 9, 4, 4), (3, 5, 2, 3, 1)])
def test_cpu_kernel_matches_the_pytorch_path(shape):
    """Voxel counts off the SIMD width, 2-5 classes, a non-unit upstream gradient."""
    assert cpu_kernels_available()
    torch.manual_seed(4)
    logits = (4 * torch.randn(shape)).requires_grad_()
    labels = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]))
    kernel, ops = _DiceCE.apply(logits, labels, True), _DiceCE.apply(logits, labels, False)
    (grad_kernel,) = torch.autograd.grad(kernel * 0.7, logits)
    (grad_ops,) = torch.autograd.grad(ops * 0.7, logits)
    torch.testing.assert_close(kernel, ops, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_kernel, grad_ops, rtol=1e-4, atol=1e-8)


def test_veloxseg_loss_fused_and_reference_agree_over_heads():
    torch.manual_seed(3)
    heads = [torch.randn(2, 3, 8, 8, 8, requires_grad=True) for _ in range(2)]
    label = torch.randint(0, 3, (2, 1, 8, 8, 8)).float()
    image = torch.randn(2, 1, 8, 8, 8)
    fused = VeloxSegLoss(1.0, 0.0, 0.0)(VeloxSegOutput(heads), image, label)["loss"]
    reference = VeloxSegLoss(1.0, 0.0, 0.0, fused=False)(VeloxSegOutput(heads), image, label)["loss"]
    torch.testing.assert_close(fused, reference)
    grads_fused = torch.autograd.grad(fused, heads)
    grads_reference = torch.autograd.grad(reference, heads)
    for a, b in zip(grads_fused, grads_reference):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("logits_shape", "labels", "message"),
    [
        ((2, 3, 4, 4, 4), torch.full((2, 1, 4, 4, 4), 3), r"class indices in \[0, 2\], got values in \[3, 3\]"),
        ((2, 3, 4, 4, 4), torch.full((2, 1, 4, 4, 4), -1), r"class indices in \[0, 2\]"),
        ((2, 3, 4, 4, 4), torch.zeros(2, 1, 4, 4, 3), r"labels must be \(B, 1, \*spatial\) = \[2, 1, 4, 4, 4\]"),
        ((2, 3, 4, 4, 4), torch.zeros(2, 3, 4, 4, 4), r"labels must be \(B, 1, \*spatial\)"),
        ((2, 1, 4, 4, 4), torch.zeros(2, 1, 4, 4, 4), r">= 2 classes \(background first\), got logits \[2, 1,"),
    ],
)
def test_dice_ce_bad_input(logits_shape, labels, message):
    with pytest.raises(ValueError, match=message):
        dice_ce_loss(torch.randn(logits_shape), labels)


def test_keep_freed_memory_in_a_fresh_process():
    """glibc (this project's Linux CI): the settings take effect; a second call is a cached no-op."""
    code = (
        "from veloxseg.training.allocator import keep_freed_memory;"
        "print(keep_freed_memory(), keep_freed_memory())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    expected = str(platform.libc_ver()[0] == "glibc")
    assert out == [expected, expected]


def test_without_a_compiler_the_loss_warns_once_and_falls_back(monkeypatch):
    import veloxseg.layers.cpu_kernels as cpu_kernels

    def no_compiler() -> None:
        raise RuntimeError("could not build veloxseg's CPU kernels: c++: command not found")

    monkeypatch.setattr(cpu_kernels, "load_cpu_kernels", no_compiler)
    with pytest.warns(UserWarning, match="c\\+\\+: command not found; using the slower PyTorch fallback"):
        assert cpu_kernels.cpu_kernels_available.__wrapped__() is False
