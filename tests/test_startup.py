"""Start-up cost: the CLI and the database commands load neither torch nor open_clip; the public names still import."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

import engine
import indexer
from storage import ImageRecord, Store

HEAVY = ("torch", "torchvision", "open_clip")
REPORT = f"import json, sys; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"


def heavy_modules_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has loaded after running `code` (in the test's $CLIPBT_HOME)."""
    result = subprocess.run([sys.executable, "-c", f"{code}\n{REPORT}"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def heavy_modules_after_commands(commands: list[list[str]]) -> list[str]:
    """The heavy modules loaded by running `clipbt` with each of `commands` in one fresh interpreter."""
    return heavy_modules_after(
        "from click.testing import CliRunner\n"
        "from engine.cli import main\n"
        f"for args in {commands!r}:\n"
        "    result = CliRunner().invoke(main, args)\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
    )


@pytest.fixture
def images(isolated_home):
    """Four images /data/0.jpg ... /data/3.jpg in collection "default", embedded as the unit vectors of R^4."""
    with Store.open(home=isolated_home) as store:
        coll = store.get_or_create_collection("default", "ViT-B-32", "openai", 4)
        records = [ImageRecord(f"/data/{i}.jpg", hashlib.sha256(bytes([i])).hexdigest(), 8, 8) for i in range(4)]
        store.add_images(coll.id, records, np.eye(4, dtype=np.float32))
    return isolated_home


def test_importing_the_cli_loads_no_torch():
    assert heavy_modules_after("import engine.cli") == []


def test_database_commands_load_no_torch(images, tmp_path):
    assert (
        heavy_modules_after_commands(
            [
                ["--help"],
                ["prefer", "--user", "ann", "--query", "q", "/data/0.jpg", "/data/1.jpg"],
                ["rank", "--user", "ann", "--query", "q", "/data/2.jpg", "/data/1.jpg", "/data/0.jpg"],
                ["feedback", "--user", "bob", "--query", "q", "--good", "/data/3.jpg", "--bad", "/data/0.jpg"],
                ["users"],
                ["prefs", "list"],
                ["prefs", "export", "--user", "ann", "--output", str(tmp_path / "ann.jsonl")],
                ["users", "delete", "ann"],
                ["prefs", "import", str(tmp_path / "ann.jsonl")],
                ["export-embeddings", str(tmp_path / "embeddings")],
            ]
        )
        == []
    )
    with Store.open(home=images) as store:
        assert store.users() == ["ann", "bob"] and len(store.pairs("ann")) == 4 and len(store.pairs("bob")) == 1


def test_searching_by_vector_loads_neither_torch_nor_open_clip(images, tmp_path):
    np.save(tmp_path / "query.npy", np.array([1, 0, 0, 0], dtype=np.float32))
    assert heavy_modules_after_commands([["search", "--vector", str(tmp_path / "query.npy"), "-k", "2"]]) == []


def test_the_encoder_module_loads_open_clip_only_for_a_model():
    code = (
        "import indexer.pipeline\n"
        "from indexer.encoder import model_identity\n"
        "assert model_identity('hf-hub:org/repo', None) == ('hf-hub:org/repo', 'bundled')\n"
    )
    assert heavy_modules_after(code) == ["torch"]


def test_public_names_still_import():
    for package in (engine, indexer):
        assert all(getattr(package, name) is not None for name in package.__all__), package.__name__
        with pytest.raises(AttributeError):
            package.no_such_name  # noqa: B018
    from engine import Engine, adapt  # noqa: F401
    from indexer import Encoder  # noqa: F401

    assert engine.Engine.__module__ == "engine.search" and indexer.Encoder.__module__ == "indexer.encoder"


def run_without_faiss(commands: list[list[str]]) -> list[tuple[int, str]]:
    """(exit code, output) of `clipbt` with each of `commands`, in a fresh interpreter where `import faiss` fails."""
    code = (
        "import json, sys\n"
        "sys.modules['faiss'] = None  # as if no FAISS wheel were installed\n"
        "import storage\n"
        "assert 'faiss' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "from click.testing import CliRunner\n"
        "from engine.cli import main\n"
        f"print(json.dumps([(r.exit_code, r.output) for r in (CliRunner().invoke(main, a) for a in {commands!r})]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [tuple(row) for row in json.loads(result.stdout.splitlines()[-1])]


def test_without_faiss_everything_but_search_works_and_search_names_the_wheels(images, tmp_path):
    np.save(tmp_path / "query.npy", np.array([1, 0, 0, 0], dtype=np.float32))
    outcomes = run_without_faiss(
        [
            ["prefer", "--user", "ann", "--query", "q", "/data/0.jpg", "/data/1.jpg"],
            ["users"],
            ["prefs", "export"],
            ["info"],
            ["search", "--vector", str(tmp_path / "query.npy"), "-k", "2"],
        ]
    )
    assert [code for code, _ in outcomes[:4]] == [0, 0, 0, 0], outcomes
    assert "ann" in outcomes[1][1] and '"preferred": "/data/0.jpg"' in outcomes[2][1]
    assert "faiss not installed" in outcomes[3][1]
    code, output = outcomes[4]
    assert code == 1 and "Traceback" not in output
    assert (
        "Error: FAISS is not installed" in output and "pip install faiss-cpu, or faiss-gpu on a CUDA machine" in output
    )
