"""What a new user hit in the CLI: --db / CLIPBT_DATABASE_URL, `collections`, copying preferences between
collections, a note for a user without preferences, missing files marked in results."""

import json
import re

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from indexer_fixtures import TEST_MODEL, make_images, register_test_model
from local_servers import free_port

from engine.cli import main
from storage import Store

MODEL = ["--model", TEST_MODEL, "--pretrained", "random", "--workers", "0", "--no-progress"]


@pytest.fixture(autouse=True)
def test_model():
    register_test_model()


def clipbt(*args, env=None, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, input=input)


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def index_dirs(home):
    return sorted(p.name for p in (home / "indexes").glob("*/collection-*"))


# -- 3: --db and CLIPBT_DATABASE_URL ------------------------------------------------------------


@pytest.mark.parametrize("how", ["option", "env"])
def test_a_sqlite_url_is_the_store_of_every_command(tmp_path, how):
    home, db = tmp_path / "home", f"sqlite:///{tmp_path / 'elsewhere' / 'my.db'}"
    make_images(tmp_path / "photos", 4)
    pre, env = (["--db", db], None) if how == "option" else ([], {"CLIPBT_DATABASE_URL": db})
    ok(clipbt("--home", home, *pre, "index", tmp_path / "photos", *MODEL, env=env))
    ok(
        clipbt(
            "--home",
            home,
            *pre,
            "prefer",
            "--user",
            "ann",
            "--query",
            "q",
            tmp_path / "photos" / "img001.png",
            tmp_path / "photos" / "img002.jpg",
            env=env,
        )
    )
    hits = json.loads(
        ok(clipbt("--home", home, *pre, "search", "q", "--user", "ann", "-k", "2", "--json", env=env)).stdout
    )
    assert len(hits) == 2
    listing = ok(clipbt("--home", home, *pre, "collections", "--json", env=env))
    assert json.loads(listing.stdout) == [
        {
            "name": "default",
            "model": TEST_MODEL,
            "pretrained": "random",
            "dim": 32,
            "images": 4,
            "users": 1,
            "backend": "sqlite",
        }
    ]
    assert not (home / "clipbt.db").exists() and (tmp_path / "elsewhere" / "my.db").is_file()
    assert index_dirs(home) == ["collection-1"]  # index files stay under the data home
    assert not (tmp_path / "elsewhere" / "indexes").exists()


@pytest.mark.postgres
def test_a_postgresql_url_is_the_store_of_every_command(tmp_path, pg_url):
    home, db = tmp_path / "home", pg_url.render_as_string(hide_password=False)
    make_images(tmp_path / "photos", 3)
    ok(clipbt("--home", home, "--db", db, "index", tmp_path / "photos", *MODEL))
    ok(clipbt("--home", home, "--db", db, "search", "q", "-k", "1"))
    listing = json.loads(ok(clipbt("--home", home, "--db", db, "collections", "--json")).stdout)
    assert [(c["name"], c["images"], c["backend"]) for c in listing] == [("default", 3, "postgresql")]
    assert not (home / "clipbt.db").exists() and len(index_dirs(home)) == 1


def test_an_unreachable_server_is_one_error_naming_the_host_never_the_password(tmp_path):
    port = free_port()
    result = clipbt("--home", tmp_path, "--db", f"postgresql://ann:s3cret@127.0.0.1:{port}/clipbt", "users")
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("Error: cannot open store") and f"127.0.0.1:{port}" in result.output
    assert "s3cret" not in result.output and "Traceback" not in result.output
    bad = clipbt("--home", tmp_path, "--db", "mysql://ann:s3cret@db.example/clipbt", "users")
    assert bad.exit_code == 1 and "unsupported database" in bad.output and "s3cret" not in bad.output
    nonsense = clipbt("--home", tmp_path, "--db", "ann:s3cret@nowhere", "users")
    assert nonsense.exit_code == 1 and "not a database URL" in nonsense.output and "s3cret" not in nonsense.output


# -- 4: collections ----------------------------------------------------------------------------


@pytest.fixture
def two_collections(tmp_path):
    """Collections a and b of the same four files, with ann's preferences recorded in a."""
    home, photos = tmp_path / "home", tmp_path / "photos"
    paths = make_images(photos, 4)
    for name in ("a", "b"):
        ok(clipbt("--home", home, "index", photos, "--collection", name, *MODEL))
    ok(clipbt("--home", home, "prefer", "-c", "a", "--user", "ann", "--query", "q", paths[0], paths[1]))
    ok(clipbt("--home", home, "rank", "-c", "a", "--user", "ann", "--query", "r", paths[3], paths[2], paths[1]))
    return home, paths


def test_collections_lists_name_model_dim_images_users_backend(two_collections):
    home, _ = two_collections
    lines = ok(clipbt("--home", home, "collections")).stdout.splitlines()
    assert [line.split() for line in lines] == [
        ["name", "model", "dim", "images", "users", "backend"],
        ["a", TEST_MODEL, "32", "4", "1", "sqlite"],
        ["b", TEST_MODEL, "32", "4", "0", "sqlite"],
    ]


def test_preferences_are_copied_to_another_collection_by_path(two_collections, tmp_path):
    home, _ = two_collections
    exported = ok(clipbt("--home", home, "prefs", "export", "--collection", "a")).stdout
    assert len(exported.splitlines()) == 2
    assert ok(clipbt("--home", home, "prefs", "export", "--collection", "b")).stdout == ""
    ok(clipbt("--home", home, "prefs", "import", "--collection", "b", "-", input=exported))
    with Store.open(home=home) as store:
        uri = {i.id: i.uri for c in ("a", "b") for i in store.images(c)}
        in_a, in_b = ([(uri[p.preferred_id], uri[p.rejected_id], p.query) for p in store.pairs("ann", c)] for c in "ab")
    assert in_a == in_b and len(in_b) == 1 + 3


def test_rename_keeps_everything_and_refuses_a_taken_name(two_collections):
    home, _ = two_collections
    assert ok(clipbt("--home", home, "collections", "rename", "a", "c")).stdout == "renamed collection 'a' to 'c'\n"
    taken = clipbt("--home", home, "collections", "rename", "c", "b")
    assert taken.exit_code == 1 and "a collection 'b' exists" in taken.output
    ok(clipbt("--home", home, "search", "q", "-c", "c", "--user", "ann", "-k", "2"))
    rows = json.loads(ok(clipbt("--home", home, "collections", "--json")).stdout)
    assert [(r["name"], r["images"], r["users"]) for r in rows] == [("c", 4, 1), ("b", 4, 0)]


def test_delete_asks_then_removes_images_embeddings_index_and_preferences(two_collections):
    home, _ = two_collections
    ok(clipbt("--home", home, "search", "q", "-c", "a", "-k", "1"))  # saves a's index
    assert index_dirs(home) == ["collection-1", "collection-2"]
    declined = clipbt("--home", home, "collections", "delete", "a", input="n\n")
    assert declined.exit_code == 1 and "Aborted" in declined.output
    assert "Delete collection 'a' (4 images, preferences of 1 users)?" in declined.output
    done = ok(clipbt("--home", home, "collections", "delete", "a", "--yes"))
    assert done.stdout == "deleted collection 'a': 4 images, 1 pairs, 1 rankings, 0 feedback\n"
    assert index_dirs(home) == ["collection-2"]
    with Store.open(home=home) as store:
        assert [c.name for c in store.collections()] == ["b"] and store.users() == ["ann"]
        assert store.pairs("ann") == []
        with store._engine.connect() as conn:
            counts = [
                conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar()
                for t in ("images", "embeddings", "rankings", "ranking_items")
            ]
    assert counts == [4, 4, 0, 0]
    gone = clipbt("--home", home, "collections", "delete", "a", "--yes")
    assert gone.exit_code == 1 and "unknown collection 'a'; existing: b" in gone.output


# -- 8 and 9: what search says ------------------------------------------------------------------


def test_search_notes_a_user_without_preferences_here(two_collections):
    home, _ = two_collections
    known = ok(clipbt("--home", home, "search", "q", "-c", "a", "--user", "ann", "-k", "2"))
    assert known.stderr == ""
    typo = ok(clipbt("--home", home, "search", "q", "-c", "a", "--user", "anne", "-k", "2"))
    assert typo.stderr.startswith(
        "note: 'anne' is not a known user, so these are the plain results (did you mean 'ann'?)"
    )
    elsewhere = ok(clipbt("--home", home, "search", "q", "-c", "b", "--user", "ann", "-k", "2"))
    assert "'ann' has no preferences in collection 'b', so these are the plain results" in elsewhere.stderr
    plain = ok(clipbt("--home", home, "search", "q", "-c", "b", "-k", "2"))
    assert plain.stderr == ""


def test_search_marks_results_whose_file_is_gone(two_collections):
    home, paths = two_collections
    paths[2].unlink()
    text = ok(clipbt("--home", home, "search", "q", "-c", "b", "-k", "4"))
    marked = [line for line in text.stdout.splitlines() if line.endswith("(missing)")]
    assert len(marked) == 1 and str(paths[2]) in marked[0]
    assert (
        "1 of these files are gone" in text.stderr
        and "clipbt index FOLDER --remove-missing --collection b" in text.stderr
    )
    hits = json.loads(ok(clipbt("--home", home, "search", "q", "-c", "b", "-k", "4", "--json")).stdout)
    assert {h["path"]: h["missing"] for h in hits} == {str(p): p == paths[2] for p in paths}
    ok(
        clipbt(
            "--home",
            home,
            "index",
            paths[0].parent.parent if paths[0].parent.name == "sub" else paths[0].parent,
            "-c",
            "b",
            "--remove-missing",
            *MODEL,
        )
    )
    after = ok(clipbt("--home", home, "search", "q", "-c", "b", "-k", "3"))  # k may not exceed the 3 left
    assert "(missing)" not in after.stdout and after.stderr == ""
    assert not re.search(re.escape(str(paths[2])), after.stdout)
