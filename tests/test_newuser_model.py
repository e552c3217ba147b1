"""What a new user meets first about models: the shipped model by name, a note when it indexes other images,
one fast clear error for hub weights without network, and the numpy text tower a search uses."""

import time

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from indexer_fixtures import make_images
from local_servers import free_port

from engine.cli import main
from engine.cli.index import TINY_NOTE
from indexer.default_model import config_path, load_default_model, weights_path
from indexer.default_model.text import NumpyTextEncoder
from indexer.encoder import GENERAL_MODEL, Encoder, TextEncoder, model_identity
from indexer.world import write_collection

TEXTS = [
    "a red circle",
    "A  Blue STAR!!",
    "café &amp; crème, 42 ümlauts",
    "",
    "x " * 50,
    "an astronaut's rocket, isn't it?",
    "three small green triangles",
]


def test_numpy_text_tower_matches_open_clip():
    model, _, tokenizer = load_default_model()
    fast = NumpyTextEncoder(config_path(), weights_path())
    tokens = tokenizer(TEXTS)
    assert np.array_equal(fast.tokenizer(TEXTS), tokens.numpy())
    with torch.inference_mode():
        slow = model.encode_text(tokens).numpy()
    np.testing.assert_allclose(fast.encode_text(TEXTS), slow, atol=1e-4, rtol=1e-4)


def test_search_encoder_of_the_shipped_model_equals_the_full_one():
    full, text_only = Encoder.load("clipbt-tiny", device="cpu"), TextEncoder()
    assert (text_only.model_name, text_only.pretrained, text_only.dim) == (full.model_name, full.pretrained, full.dim)
    np.testing.assert_allclose(text_only.encode_text(TEXTS), full.encode_text(TEXTS), atol=1e-5)


def test_the_shipped_model_is_selectable_by_the_name_info_shows():
    assert model_identity("clipbt-tiny", None) == model_identity(None, None)
    assert model_identity(None, None)[0] == "clipbt-tiny"


def test_clipbt_tiny_on_a_folder_outside_its_world_says_what_it_is_for(tmp_path):
    make_images(tmp_path / "photos", 2)
    write_collection(tmp_path / "world", 3, seed=1)
    args = ["--home", str(tmp_path / "home"), "index", "--model", "clipbt-tiny", "--workers", "0", "--no-progress"]
    photos = CliRunner().invoke(main, [*args, str(tmp_path / "photos")])
    assert photos.exit_code == 0, photos.output
    assert photos.stderr.count(TINY_NOTE) == 1
    world = CliRunner().invoke(main, [*args, "--collection", "world", str(tmp_path / "world")])
    assert world.exit_code == 0, world.output
    assert TINY_NOTE not in world.stderr


@pytest.mark.parametrize("offline", [False, True], ids=["unreachable-hub", "HF_HUB_OFFLINE"])
def test_hub_weights_without_network_fail_within_10_s_with_one_message(tmp_path, monkeypatch, offline):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    make_images(tmp_path / "photos", 1)
    start = time.monotonic()
    result = CliRunner().invoke(main, ["--home", str(tmp_path / "home"), "index", str(tmp_path / "photos")])
    elapsed = time.monotonic() - start
    assert result.exit_code == 1 and elapsed < 10, (elapsed, result.output)
    model, tag = GENERAL_MODEL
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot load weights for model {model!r} pretrained {tag!r}")
    for needed in (
        str(tmp_path / "hf-cache"),
        "open_clip.create_model_and_transforms",
        "HF_HUB_OFFLINE",
        "--model clipbt-tiny",
    ):
        assert needed in lines[0], needed
    assert ("HF_HUB_OFFLINE is set" in lines[0]) == offline


def test_encoding_in_paced_slices_equals_one_batch_and_reports_every_slice():
    from indexer_fixtures import tiny_encoder

    from indexer.pipeline import _Pace

    encoder = tiny_encoder()
    pixels = torch.from_numpy(np.random.default_rng(0).random((21, 3, 32, 32), dtype=np.float32))
    reported = []
    sliced = _Pace(first=4).encode(encoder, pixels, reported.append)
    np.testing.assert_allclose(sliced, encoder.encode_images(pixels), atol=1e-5)
    assert sum(reported) == 21 and reported[0] == 4 and len(reported) >= 2
