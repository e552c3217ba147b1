"""The query and preference commands end to end through CliRunner, on a dozen indexed images."""

import json
from pathlib import Path

import click
import numpy as np
import open_clip
import pytest
from click.testing import CliRunner
from PIL import Image

from engine.cli import main

TEST_MODEL = "clipbt-test-vit"  # tests/model_configs/clipbt-test-vit.json, random weights
COLOURS = [(220, 35, 35), (40, 170, 60), (40, 70, 225), (240, 220, 30), (140, 50, 200), (30, 200, 220)]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A data home with a dozen small images indexed by the test model: (home, image folder)."""
    if TEST_MODEL not in open_clip.list_models():
        open_clip.add_model_config(Path(__file__).parent / "model_configs" / f"{TEST_MODEL}.json")
    home, pictures = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    for i in range(12):
        pixels = np.full((32, 32, 3), COLOURS[i % len(COLOURS)], dtype=np.uint8)
        pixels[rng.integers(0, 24) :, rng.integers(0, 24) :] = 255 - i * 20
        Image.fromarray(pixels).save(pictures / f"img{i:02d}.png")
    result = CliRunner().invoke(
        main,
        [
            "--home",
            str(home),
            "index",
            str(pictures),
            "--model",
            TEST_MODEL,
            "--pretrained",
            "random",
            "--workers",
            "0",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    return home, pictures


@pytest.fixture
def run(indexed, tmp_path):
    """Invoke clipbt on a private copy of the indexed home (preferences never leak between tests)."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(indexed[0], home)

    def invoke(*args, home=home):
        return CliRunner().invoke(main, ["--home", str(home), *args], catch_exceptions=False)

    invoke.home = home
    return invoke


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_search_prints_rank_id_score_path(run, indexed):
    result = run("search", "a red square", "-k", "3")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 3
    rank, image_id, score, path = lines[0].split()
    assert rank == "1" and int(image_id) > 0 and float(score) and path.startswith(str(indexed[1]))


def test_search_json_and_prefer_moves_an_image_up(run, indexed):
    before = _json(run("search", "a red square", "-k", "12", "--json"))
    assert {"id", "path", "score", "rank", "p_next"} <= set(before[0])
    assert [h["rank"] for h in before] == list(range(1, 13))
    last, first = before[-1], before[0]
    for i in range(3):  # a few different pairs lifting the last image
        other = before[i]["path"]
        assert run("prefer", "--user", "ann", "--query", "a red square", last["path"], other).exit_code == 0
    after = _json(run("search", "a red square", "--user", "ann", "-k", "12", "--json"))
    assert [h["id"] for h in after].index(last["id"]) < 11
    plain = _json(run("search", "a red square", "--user", "ann", "-k", "12", "--no-adapt", "--json"))
    assert [h["id"] for h in plain] == [h["id"] for h in before]
    assert first["id"] in {h["id"] for h in after}


def test_search_options_reach_the_adaptation(run):
    run("prefer", "--user", "ann", "--query", "q", "3", "4")
    default = _json(run("search", "q", "--user", "ann", "-k", "12", "--json"))
    stronger = _json(
        run(
            "search",
            "q",
            "--user",
            "ann",
            "-k",
            "12",
            "--json",
            "--lr",
            "5",
            "--steps",
            "7",
            "--beta",
            "2",
            "--scope",
            "all",
        )
    )
    assert [h["score"] for h in default] != [h["score"] for h in stronger]


def test_search_with_a_vector_file(run, tmp_path):
    dim = _json(run("info", "--json"))["dim"]
    vector = tmp_path / "q.npy"
    np.save(vector, np.random.default_rng(0).standard_normal(dim).astype(np.float32))
    hits = _json(run("search", "--vector", str(vector), "-k", "4", "--json"))
    assert len(hits) == 4 and hits[0]["score"] >= hits[-1]["score"]


def test_rank_feedback_and_compare(run):
    assert run("compare", "--query", "a cat", "1", "2", "--json").exit_code == 0
    p = _json(run("compare", "--user", "bo", "--query", "a cat", "1", "2", "--json"))["p"]
    assert 0 < p < 1
    result = run("rank", "--user", "bo", "--query", "a cat", "2", "5", "1")
    assert result.output == "bo ranks 2 > 5 > 1 for 'a cat'\n"
    assert _json(run("compare", "--user", "bo", "--query", "a cat", "2", "1", "--json"))["p"] > 1 - p
    result = run("feedback", "--user", "bo", "--query", "a dog", "--good", "3", "4", "--bad", "6")
    assert result.output == "bo: 2 good, 1 bad for 'a dog'\n"
    pairs = [r for r in _json(run("prefs", "list", "--user", "bo", "--json"))]
    assert [r["kind"] for r in pairs] == ["ranking", "feedback"]
    assert len(pairs[1]["good"]) == 2 and len(pairs[1]["bad"]) == 1
    text = run("compare", "--user", "bo", "--query", "a dog", "3", "6").output
    assert text.startswith("P(3 over 6) = 0.")


def test_prefs_export_import_round_trip_and_users(run, tmp_path):
    run("prefer", "--user", "cy", "--query", "a cat", "1", "2")
    run("rank", "--user", "cy", "--query", "a dog", "3", "4", "5")
    run("feedback", "--user", "di", "--query", "a cow", "--good", "6", "--bad", "7", "8")
    assert run("users").output == "cy\ndi\n"
    exported = run("prefs", "export").output
    assert len(exported.strip().splitlines()) == 3
    result = run("users", "delete", "cy")
    assert result.output == "deleted user 'cy': 1 pairs, 1 rankings, 0 feedback\n"
    assert _json(run("users", "--json")) == ["di"]
    assert _json(run("prefs", "list", "--user", "di", "--json"))[0]["bad"][1].endswith("img07.png")
    other = tmp_path / "out.jsonl"
    run("prefs", "export", "--user", "di", "-o", str(other))
    run("users", "delete", "di")
    (tmp_path / "all.jsonl").write_text(exported)
    assert _json(run("prefs", "import", str(tmp_path / "all.jsonl"), "--json")) == {
        "new": {"pair": 1, "ranking": 1, "feedback": 1},
        "present": {"pair": 0, "ranking": 0, "feedback": 0},
    }
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if k != "created"} for line in text.splitlines()]  # noqa: E731
    assert strip(run("prefs", "export").output) == strip(exported)


def test_info(run):
    data = _json(run("info", "--json"))
    assert data["images"] == 12 and data["model"] == TEST_MODEL and data["dim"] == 32
    assert data["index_type"] == "flat" and data["collection"] == "default"
    assert data["flat_search"].startswith("faiss: ")  # on a CPU (choose_flat_backend)
    assert "images" in run("info").output


def test_home_is_honoured(run, tmp_path, monkeypatch):
    result = run("info", home=tmp_path / "elsewhere")
    assert result.exit_code == 1 and result.output == "Error: no collection yet: add images with `clipbt index PATH`\n"
    monkeypatch.setenv("CLIPBT_HOME", str(tmp_path / "elsewhere"))
    result = CliRunner().invoke(main, ["search", "a cat"])
    assert result.exit_code == 1 and result.output == "Error: no collection yet: add images with `clipbt index PATH`\n"


def test_errors(run, tmp_path):
    cases = [
        (("prefer", "--user", "new", "--query", "q", "999", "1"), "Error: no image '999' in collection 'default'\n"),
        (("compare", "--query", "q", "1", "/no/such.png"), "Error: no image '/no/such.png' in collection 'default'\n"),
        (("search", "q", "-k", "0"), "Error: k must be a whole number >= 1, got 0\n"),
        (("search", "q", "-k", "-3"), "Error: k must be a whole number >= 1, got -3\n"),
        (("users", "delete", "ghost"), "Error: unknown user 'ghost'\n"),
        (("search",), "Error: a search needs query text or a vector, got query None\n"),
    ]
    short, nan = tmp_path / "short.npy", tmp_path / "nan.npy"
    np.save(short, np.ones(3, dtype=np.float32))
    np.save(nan, np.r_[np.ones(31), np.nan].astype(np.float32))
    cases += [
        (
            ("search", "--vector", str(short)),
            "Error: query vector has shape (3,), but collection 'default' has dimension 32\n",
        ),
        (("search", "--vector", str(nan)), "Error: query vector[31] is nan: a query vector must be finite\n"),
    ]
    for args, message in cases:
        result = run(*args)
        assert (result.exit_code, result.output) == (1, message), args
    assert "Traceback" not in result.output
    assert run("prefer", "--user", "new", "--query", "q", "1", "2").exit_code == 0  # unknown user: created
    assert "new" in run("users").output


def test_empty_collection_error(run):
    from storage import Store

    with Store.open(home=run.home) as store:
        store.mark_deleted(store.image_ids("default"))
    result = run("search", "a cat")
    assert (result.exit_code, result.output) == (
        1,
        "Error: collection 'default' has no images: add some with `clipbt index PATH`\n",
    )


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


def test_every_command_has_help_with_an_example():
    runner = CliRunner()
    missing = []
    for path, _ in _commands(main):
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, path
        if "Example:" not in result.output or "clipbt " not in result.output.split("Example:")[1]:
            missing.append(" ".join(path))
    assert missing == []
