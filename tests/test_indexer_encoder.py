"""The encoder on a tiny random-weight open_clip model: unit-norm embeddings, model identity, and clear errors when weights cannot be had."""

import os

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from indexer_fixtures import TEST_MODEL, picture, tiny_encoder

from indexer.encoder import Encoder, model_identity
from indexer.errors import ModelUnavailableError


def test_embeddings_are_unit_norm_float32():
    encoder = tiny_encoder()
    assert (encoder.model_name, encoder.pretrained, encoder.dim, encoder.device.type) == (
        TEST_MODEL,
        "random",
        32,
        "cpu",
    )
    text = encoder.encode_text(["a photo of a cat", "a dog"])
    pixels = torch.stack([encoder.preprocess(picture(i)) for i in range(3)])
    images = encoder.encode_images(pixels)
    for out, n in ((text, 2), (images, 3)):
        assert out.dtype == np.float32 and out.shape == (n, 32)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


def test_batched_encoding_equals_one_at_a_time():
    encoder = tiny_encoder()
    pixels = torch.stack([encoder.preprocess(picture(i)) for i in range(4)])
    one_by_one = np.vstack([encoder.encode_images(pixels[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(encoder.encode_images(pixels), one_by_one, atol=1e-5)


def test_random_weights_are_one_fixed_model():
    again = Encoder.load(TEST_MODEL, "random", "cpu")
    np.testing.assert_array_equal(again.encode_text(["x"]), tiny_encoder().encode_text(["x"]))


def test_checkpoint_file_is_recorded_by_content(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_encoder()._model.state_dict(), path)
    loaded = Encoder.load(TEST_MODEL, str(path), "cpu")
    assert loaded.pretrained.startswith("sha256:") and len(loaded.pretrained) == 7 + 64
    assert loaded.checkpoint_path == os.path.abspath(path) and tiny_encoder().checkpoint_path is None
    assert model_identity(TEST_MODEL, str(path)) == (TEST_MODEL, loaded.pretrained)
    np.testing.assert_allclose(loaded.encode_text(["x"]), tiny_encoder().encode_text(["x"]), atol=1e-6)


@pytest.mark.parametrize(
    ("model", "pretrained", "message"),
    [
        ("ViT-B-33", "openai", r"unknown open_clip model 'ViT-B-33'\. Did you mean: .*ViT-B-32"),
        ("ViT-B-32", "nonsense", r"unknown pretrained tag 'nonsense' for model 'ViT-B-32'.*laion2b"),
        ("ViT-B-32", "/no/such/ckpt.pt", r"checkpoint file '/no/such/ckpt.pt' not found"),
        ("ViT-B-32", None, r"model 'ViT-B-32' needs pretrained weights.*'random'"),
        (None, "openai", r"pretrained 'openai' given without a model"),
    ],
)
def test_bad_model_names_are_refused_before_loading(model, pretrained, message):
    with pytest.raises(ModelUnavailableError, match=message):
        model_identity(model, pretrained)


def test_weights_that_cannot_be_downloaded_name_the_options(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailableError) as caught:
        Encoder.load("ViT-B-32", "openai", "cpu")
    message = str(caught.value)
    assert "cannot load weights for model 'ViT-B-32' pretrained 'openai'" in message
    assert "--pretrained PATH to a checkpoint file" in message and "--model clipbt-tiny" in message
    assert caught.value.__cause__ is None and (caught.value.__context__ is None or caught.value.__suppress_context__)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_float16_matches_cpu():
    gpu = Encoder.load(TEST_MODEL, "random")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float16
    pixels = torch.stack([gpu.preprocess(picture(i)) for i in range(4)])
    np.testing.assert_allclose(gpu.encode_images(pixels), tiny_encoder().encode_images(pixels), atol=2e-2)
