"""veloxseg.optimize: the compiled copy computes the authors' function, for any batch, and stays inference-only.

One compilation (the reference model, batches of 2) serves the whole module: it takes about a minute.
"""

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

import veloxseg
from veloxseg.predict import load_scan, predict_probabilities

from .test_reference import TOLERANCE, authors_state_dict, relative_errors


@pytest.fixture(scope="module")
def reference_model(reference):
    return veloxseg.load_reference(authors_state_dict(reference), reference["metadata"]["config"]).eval()


@pytest.fixture(scope="module")
def optimized(reference_model):
    return veloxseg.optimize(reference_model, batch_size=2)


def strided(logits: torch.Tensor, reference: dict) -> torch.Tensor:
    s = slice(None, None, int(reference["metadata"]["stride"]))
    return logits[:, :, s, s, s]


def test_matches_the_reference_vectors(reference, optimized):
    t = reference["tensors"]
    logits = optimized(t["input"])
    assert max(relative_errors(strided(logits, reference), t["eval.logits.strided"])) < TOLERANCE


@pytest.mark.parametrize("samples", [[1], [1, 0, 1]])
def test_other_batch_sizes_are_padded_not_recompiled(reference, optimized, samples):
    t = reference["tensors"]
    logits = optimized(t["input"][samples])
    assert logits.shape[0] == len(samples)
    assert max(relative_errors(strided(logits, reference), t["eval.logits.strided"][samples])) < TOLERANCE


def test_is_a_private_inference_only_copy(reference, reference_model, optimized):
    x = reference["tensors"]["input"][:1]
    before = optimized(x)
    original = reference_model.decoder.head.bias.detach().clone()
    with torch.no_grad():
        reference_model.decoder.head.bias.add_(1.0)
    try:
        assert torch.equal(optimized(x), before)
    finally:
        with torch.no_grad():
            reference_model.decoder.head.bias.copy_(original)
    with pytest.raises(RuntimeError, match="inference-only"):
        optimized.train()
    optimized.eval()


def test_warns_before_compiling_for_a_new_thread_count(reference, reference_model):
    """Dynamo recompiles when torch's thread count changes (its global-state guard): each new count is
    announced once. The eager forward stands in for the compiled one here (no minute of compiling)."""
    optimized = veloxseg.OptimizedVeloxSeg(reference_model)
    assert not optimized.training  # callers that restore the mode afterwards (predict) must not train it
    optimized.compiled_forward = optimized.model.forward_embedded
    x = reference["tensors"]["input"][:1]
    threads = torch.get_num_threads()
    other = threads + 1 if threads == 1 else threads - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimized(x)  # the first compilation: optimize() itself, nothing to say
    try:
        torch.set_num_threads(other)
        with pytest.warns(UserWarning, match=f"compiled for \\[{threads}\\] CPU thread.*uses {other}"):
            optimized(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            optimized(x)
    finally:
        torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimized(x)  # back to a compiled count


def test_bad_input_is_rejected_before_compiling(optimized):
    with pytest.raises(ValueError, match="input channels"):
        optimized(torch.zeros(1, 3, 96, 96, 96))
    with pytest.raises(ValueError, match="spatial size"):
        optimized(torch.zeros(1, 2, 64, 64, 64))
    with pytest.raises(TypeError, match="VeloxSeg model"):
        veloxseg.optimize(torch.nn.Conv3d(2, 2, 1))
    with pytest.raises(ValueError, match="batch_size"):
        veloxseg.optimize(veloxseg.create_model("veloxseg_tiny"), batch_size=0)


def test_whole_scan_prediction_matches_the_eager_model(reference_model, optimized):
    rng = np.random.default_rng(0)
    scan = load_scan(nib.Nifti1Image(rng.normal(size=(100, 104, 98, 2)).astype(np.float32), np.eye(4)))
    eager = predict_probabilities(reference_model, scan, sw_batch_size=3)
    compiled = predict_probabilities(optimized, scan, sw_batch_size=3)
    assert compiled.shape == eager.shape == (2, 100, 104, 98)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
