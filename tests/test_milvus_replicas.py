"""Stateless service replicas: two `clipbt serve` processes over one PostgreSQL and one `milvus-lite server`; what one replica records, the other's next search sees."""

import json
import subprocess
import sys
import urllib.parse
import urllib.request
from contextlib import ExitStack

import pytest
from click.testing import CliRunner
from indexer_fixtures import TEST_MODEL, clipbt_argv, make_images, register_test_model
from local_servers import free_port, wait_for_port

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
pytest.importorskip("uvicorn")

from engine.cli import main

MODEL = ["--model", TEST_MODEL, "--pretrained", "random", "--workers", "0", "--no-progress"]
START_S = 90  # the most a server may take to answer (a replica loads torch and the model)


def _started(stack: ExitStack, argv: list[str], env=None) -> subprocess.Popen:
    """A server process, killed (and waited for) when `stack` closes."""
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop():
        process.kill()
        process.wait(timeout=30)

    stack.callback(stop)
    return process


def _call(port: int, token: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _search(port: int, token: str, query: str, k: int) -> list[int]:
    found = _call(port, token, f"search?{urllib.parse.urlencode({'q': query, 'k': k})}")
    return [r["id"] for r in found["results"]]


def test_a_preference_posted_to_one_replica_changes_the_other_replicas_next_search(pg_url, tmp_path):
    register_test_model()
    db = pg_url.render_as_string(hide_password=False)
    milvus_port, ports = free_port(), (free_port(), free_port())
    uri = f"http://127.0.0.1:{milvus_port}"
    make_images(tmp_path / "pics", 8)

    def cli(
        *args, home=tmp_path / "indexer"
    ):  # every command runs from its own data home: only SQL and Milvus are shared
        result = CliRunner().invoke(main, ["--home", str(home), "--db", db, *args])
        assert result.exit_code == 0, result.output
        return result.stdout

    with ExitStack() as stack:
        server = _started(
            stack,
            [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "milvus.db"),
             "--host", "127.0.0.1", "--port", str(milvus_port)],
        )  # fmt: skip
        wait_for_port(server, milvus_port, START_S)
        cli("index", str(tmp_path / "pics"), *MODEL, "--backend", "milvus", "--milvus-uri", uri)
        tokens = {}
        for user in ("ann", "bob"):
            cli("users", "add", user)
            tokens[user] = cli("tokens", "create", user).strip()
        replicas = []
        for n, port in enumerate(ports):
            argv, env = clipbt_argv(
                "run", "--home", str(tmp_path / f"replica{n}"), "--db", db, "serve", "--port", str(port)
            )
            replicas.append(_started(stack, argv, env))
        for replica, port in zip(replicas, ports):
            wait_for_port(replica, port, START_S)
        query = "a bright picture"
        plain = {user: _search(ports[1], tokens[user], query, 8) for user in ("ann", "bob")}
        assert plain["ann"] == plain["bob"] == _search(ports[0], tokens["ann"], query, 8)
        assert sorted(plain["ann"]) == list(range(1, 9))
        wanted = plain["ann"][::-1]  # ann ranks the images in reverse, through replica 1
        _call(ports[0], tokens["ann"], "rankings", {"query": query, "images": wanted})
        ann = _search(ports[1], tokens["ann"], query, 8)
        assert ann != plain["ann"] and ann.index(wanted[0]) < plain["ann"].index(wanted[0])
        assert _search(ports[1], tokens["bob"], query, 8) == plain["bob"]
        # an image indexed afterwards (no backend flags: the store says Milvus) is found by both replicas
        make_images(tmp_path / "pics", 2, start=8)
        assert "indexed 2" in cli("index", str(tmp_path / "pics"), *MODEL)
        for port in ports:
            assert sorted(_search(port, tokens["bob"], query, 10)) == list(range(1, 11))
