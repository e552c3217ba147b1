"""Tests of the shipped clipbt-tiny model: it loads offline by name and classifies held-out world images."""

import socket

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from indexer.default_model import DEFAULT_MODEL_NAME, load_default_model, register, weights_path
from indexer.default_model.quality import measure
from indexer.world import generate

FLOOR = 0.8  # on 200 held-out images; benchmarks/eval_default_model.py measures 5000 against the README's figures


@pytest.fixture(scope="module")
def offline():
    """No network while the model loads: the hub is told to stay offline and sockets refuse to connect."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    mp.setattr(socket.socket, "connect", refuse)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def shipped(offline):
    return load_default_model()


def test_weights_are_small_safetensors():
    assert weights_path().suffix == ".safetensors"
    assert weights_path().stat().st_size <= 20 * 1024 * 1024


def test_loads_the_committed_weights(shipped):
    model, _, _ = shipped
    stored = load_file(str(weights_path()))
    for name, value in model.state_dict().items():
        assert torch.equal(value, stored[name].to(value.dtype)), name
    assert not model.training


def test_open_clip_works_unchanged_by_name(offline):
    register()
    register()  # idempotent
    assert DEFAULT_MODEL_NAME in open_clip.list_models()
    tokenizer = open_clip.get_tokenizer(DEFAULT_MODEL_NAME)
    tokens = tokenizer(["a red circle", "two blue squares"])
    assert tokens.shape == (2, 32)
    model, _, preprocess = open_clip.create_model_and_transforms(DEFAULT_MODEL_NAME, pretrained=str(weights_path()))
    img, _ = generate(1, seed=0)[0]
    with torch.no_grad():
        image, text = model.encode_image(preprocess(img)[None]), model.encode_text(tokens)
    assert image.shape == (1, 128) and text.shape == (2, 128)


def test_zero_shot_shape_and_colour_above_floor(shipped):
    quality = measure(*shipped, n_images=200)
    assert quality.shape_accuracy >= FLOOR, quality
    assert quality.colour_accuracy >= FLOOR, quality


def test_query_ranks_the_matching_image_first(shipped):
    model, preprocess, tokenizer = shipped
    world = generate(60, seed=12345)
    target = next(i for i, (_, a) in enumerate(world) if a.count == 1 and a.quality == "clean")
    a = world[target][1]
    others = [i for i, (_, b) in enumerate(world) if (b.colour, b.shape) != (a.colour, a.shape)]
    images = torch.stack([preprocess(world[i][0]) for i in [target] + others])
    with torch.no_grad():
        sims = model.encode_image(images) @ model.encode_text(tokenizer([f"a {a.colour} {a.shape}"])).T
    assert sims[:, 0].argmax().item() == 0
