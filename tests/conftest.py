"""Shared pytest fixtures: every test gets its own empty data home and never touches the user's."""

import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Point $CLIPBT_HOME at a fresh folder and keep the model hub offline for every test."""
    home = tmp_path_factory.mktemp("clipbt-home")
    monkeypatch.setenv("CLIPBT_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture
def pg_url():
    """A PostgreSQL URL whose search_path is a fresh schema, dropped after the test."""
    import os
    import uuid

    import sqlalchemy as sa

    base = os.environ.get("CLIPBT_TEST_PG_URL")
    if not base:
        pytest.skip("CLIPBT_TEST_PG_URL is not set: no PostgreSQL server (.ci/run starts one)")
    schema = f"clipbt_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    yield sa.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request):
    """None (the default SQLite file in the data home) or a PostgreSQL URL."""
    return None if request.param == "sqlite" else request.getfixturevalue("pg_url")


@pytest.fixture
def store(store_url):
    """An empty Store, on SQLite and on PostgreSQL."""
    from storage import Store

    with Store.open(store_url) as opened:
        yield opened


@pytest.fixture(scope="session")
def encoder():
    """The random-weight test model of tests/model_configs/clipbt-test-vit.json (d = 32), loaded once."""
    from pathlib import Path

    import open_clip

    from indexer.encoder import Encoder

    name = "clipbt-test-vit"
    if name not in open_clip.list_models():
        open_clip.add_model_config(Path(__file__).parent / "model_configs" / f"{name}.json")
    return Encoder.load(name, "random", device="cpu")
