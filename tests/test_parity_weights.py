"""The tiny parity models' weights are not stored in git: conftest regenerates the reference's
model.safetensors from its recipe (tests/fixtures/parity/README.md, "How the weights were made").
This checks that the regeneration is bit-identical to the reference's file, tensor by tensor (key set,
dtype, shape and the sha256 of the raw bytes recorded in model_sha256.json), embedding manager and
buffers included, so every other parity test runs on exactly the reference's weights."""

import json

import pytest
from conftest import PARITY_NAMES, fixture_path, parity_weights, tensor_sha256
from safetensors.torch import load_file


@pytest.mark.parametrize("name", PARITY_NAMES)
def test_regenerated_weights_match_reference_hashes(name):
    expected = json.loads(fixture_path("parity", name, "model_sha256.json").read_text())["tensors"]
    ours = load_file(str(parity_weights(name)))
    assert sorted(ours) == sorted(expected), "key sets differ"
    mismatched = []
    for key, want in expected.items():
        tensor = ours[key]
        got = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
               "sha256": tensor_sha256(tensor)}
        if got != want:
            mismatched.append(key)
    assert not mismatched, f"{len(mismatched)}/{len(expected)} differ from the reference: {mismatched[:10]}"
