"""`clipbt index`, `import-embeddings` and `export-embeddings` in-process through the real command group."""

import json

import huggingface_hub.constants
import pytest
from click.testing import CliRunner
from indexer_fixtures import TEST_MODEL, make_bad_files, make_images, register_test_model

from engine.cli import main
from engine.cli.index import EXIT_SKIPPED

MODEL = ["--model", TEST_MODEL, "--pretrained", "random", "--workers", "0", "--no-progress"]


@pytest.fixture(autouse=True)
def test_model():
    register_test_model()


def run(home, *args):
    return CliRunner().invoke(main, ["--home", str(home), *args])


def test_every_command_has_help_with_an_example():
    for name in ("index", "import-embeddings", "export-embeddings"):
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Example:" in result.output, name


def test_index_json_summary_and_exit_codes(tmp_path):
    make_images(tmp_path / "photos", 4)
    result = run(tmp_path / "home", "index", str(tmp_path / "photos"), *MODEL, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) | {"seconds": None} == {
        "collection": "default",
        "indexed": 4,
        "unchanged": 0,
        "removed": 0,
        "skipped": [],
        "seconds": None,
    }
    reasons = make_bad_files(tmp_path / "photos")
    result = run(tmp_path / "home", "index", str(tmp_path / "photos"), *MODEL, "--json")
    summary = json.loads(result.stdout)
    assert result.exit_code == EXIT_SKIPPED == 3
    assert (summary["indexed"], summary["unchanged"]) == (0, 4)
    assert sorted(s["path"].rsplit("/", 1)[1] for s in summary["skipped"]) == sorted(reasons)
    assert all(set(s) == {"path", "reason"} for s in summary["skipped"])


def test_index_text_output_lists_skips(tmp_path):
    make_images(tmp_path, 2)
    (tmp_path / "empty.png").write_bytes(b"")
    result = run(tmp_path / "home", "index", str(tmp_path), *MODEL)
    assert result.exit_code == EXIT_SKIPPED
    assert f"skipped {tmp_path / 'empty.png'}: empty file (0 bytes)" in result.stderr
    assert result.stdout == "collection 'default': indexed 2, unchanged 0, removed 0, skipped 1\n"


def test_errors_are_one_line_without_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = run(tmp_path / "home", "index", str(tmp_path), "--model", "ViT-B-32", "--pretrained", "openai")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot load weights for model 'ViT-B-32' pretrained 'openai'")
    assert "Traceback" not in result.output
    result = run(tmp_path / "home", "index", str(tmp_path / "nowhere"), *MODEL)
    assert result.exit_code == 1 and "does not exist" in result.stderr
    result = run(tmp_path / "home", "index", str(tmp_path), *MODEL, "--index-type", "IVF-lots")
    assert result.exit_code == 1 and "Error: index type 'IVF-lots'" in result.stderr


def test_export_then_import_through_the_cli(tmp_path):
    make_images(tmp_path / "photos", 3)
    home = tmp_path / "home"
    assert run(home, "index", str(tmp_path / "photos"), *MODEL).exit_code == 0
    result = run(home, "export-embeddings", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["rows"] == 3
    result = run(
        home,
        "import-embeddings",
        str(tmp_path / "out"),
        "-c",
        "copy",
        "--model",
        TEST_MODEL,
        "--pretrained",
        "random",
        "--json",
    )
    assert result.exit_code == 0 and json.loads(result.stdout) == {
        "collection": "copy",
        "imported": 3,
        "unchanged": 0,
        "rejected": [],
    }
    result = run(home, "export-embeddings", str(tmp_path / "out"))
    assert result.exit_code == 1 and "already holds img_emb shards" in result.stderr


def test_flat16_index_answers_as_flat(tmp_path):
    make_images(tmp_path / "photos", 12)
    answers = {}
    for index_type in ("flat", "flat16"):
        home = tmp_path / index_type
        assert run(home, "index", str(tmp_path / "photos"), *MODEL, "--index-type", index_type).exit_code == 0
        assert json.loads(run(home, "info", "--json").stdout)["index_type"] == index_type
        answers[index_type] = json.loads(run(home, "search", "a photo", "-k", "5", "--json").stdout)
    assert [h["id"] for h in answers["flat16"]] == [h["id"] for h in answers["flat"]]
    for a, b in zip(answers["flat16"], answers["flat"], strict=True):
        assert abs(a["similarity"] - b["similarity"]) < 1e-5
