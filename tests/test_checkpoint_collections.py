"""A collection embedded with a local checkpoint file: searched again by the CLI, followed when moved, refused when changed."""

import json

import pytest
import torch
from click.testing import CliRunner
from indexer_fixtures import TEST_MODEL, make_images, register_test_model

from engine.cli import main
from indexer.encoder import Encoder


@pytest.fixture(autouse=True)
def test_model():
    register_test_model()


def run(home, *args):
    return CliRunner().invoke(main, ["--home", str(home), *args])


def save_checkpoint(path, seed):
    torch.manual_seed(seed)
    model = Encoder.load(TEST_MODEL, "random", "cpu")._model
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))  # weights of its own, not the "random" model's
    torch.save(model.state_dict(), path)
    return path


def index(home, folder, checkpoint):
    return run(
        home,
        "index",
        str(folder),
        "--model",
        TEST_MODEL,
        "--pretrained",
        str(checkpoint),
        "--workers",
        "0",
        "--no-progress",
    )


def search(home):
    return run(home, "search", "a photo", "-k", "3", "--json")


def test_search_finds_the_checkpoint_it_was_indexed_with(tmp_path):
    make_images(tmp_path / "photos", 5)
    (tmp_path / "models").mkdir()
    checkpoint = save_checkpoint(tmp_path / "models" / "mine.pt", seed=1)
    home = tmp_path / "home"
    assert index(home, tmp_path / "photos", checkpoint).exit_code == 0
    found = search(home)
    assert found.exit_code == 0, found.output
    assert len(json.loads(found.stdout)) == 3

    moved = checkpoint.rename(tmp_path / "elsewhere.pt")
    gone = search(home)
    assert gone.exit_code == 1 and "Traceback" not in gone.output
    assert f"is no longer at {checkpoint}, where it was last read" in gone.stderr
    assert f"--collection default --model {TEST_MODEL} --pretrained CHECKPOINT" in gone.stderr

    again = index(home, tmp_path / "photos", moved)  # records the new place; nothing is embedded again
    assert again.exit_code == 0 and "indexed 0, unchanged 5" in again.stdout
    assert json.loads(search(home).stdout) == json.loads(found.stdout)

    save_checkpoint(moved, seed=2)  # same path, other weights: a different model
    changed = search(home)
    assert changed.exit_code == 1 and "holds embeddings of" in changed.stderr
