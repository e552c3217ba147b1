"""Shared pytest fixtures: every test gets its own empty data home and never touches the user's."""

import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Point $CLIPBT_HOME at a fresh folder and keep the model hub offline for every test."""
    home = tmp_path_factory.mktemp("clipbt-home")
    monkeypatch.setenv("CLIPBT_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home
