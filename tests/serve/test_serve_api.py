"""The HTTP API through FastAPI's TestClient on a small indexed world: every endpoint, every error, isolation, tokens, deletion."""

import asyncio
import io
import re

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from engine.search import SearchRequest
from engine.serve import ServeConfig, create_app
from engine.serve.batching import SearchBatcher
from engine.serve.limits import LoginLimiter
from engine.serve.thumbnails import placeholder
from storage import Store
from tests.serve.worlds import indexed_world

Q = "a red circle"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("serve-home")
    indexed_world(home, 60, seed=3)
    return home


@pytest.fixture(scope="module")
def client(home):
    with TestClient(create_app(ServeConfig(home=home, login_failures=3))) as client:
        yield client


@pytest.fixture
def state(client):
    return client.app.state.serve


_names = iter(range(10_000))


@pytest.fixture
def account(state):
    """A fresh account with a password and a token: (name, password, Authorization headers)."""

    def make(password="correct horse"):
        name = f"user{next(_names)}"
        state.store.add_account(name, password)
        _, token = state.store.create_token(name)
        return name, password, {"Authorization": f"Bearer {token}"}

    return make


def ids(response):
    assert response.status_code == 200, response.text
    return [r["id"] for r in response.json()["results"]]


def search(client, headers, q=Q, k=10):
    return client.get("/api/v1/search", params={"q": q, "k": k}, headers=headers)


def test_healthz_needs_no_credential(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_openapi_describes_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/api/v1/search",
        "/api/v1/preferences",
        "/api/v1/rankings",
        "/api/v1/feedback",
        "/api/v1/duel",
        "/api/v1/compare",
        "/api/v1/me",
        "/api/v1/stats",
        "/api/v1/preferences/{record_id}",
        "/api/v1/images/{image_id}/thumbnail",
        "/api/v1/login",
    ):
        assert path in paths


@pytest.mark.parametrize(
    "headers, message",
    [
        ({}, "not logged in: send 'Authorization: Bearer TOKEN' or log in"),
        (
            {"Authorization": "Bearer cbt_nope"},
            "invalid or revoked API token: create one with `clipbt tokens create NAME`",
        ),
        ({"Authorization": "Basic abc"}, "malformed Authorization header: expected 'Bearer TOKEN'"),
        ({"Cookie": "clipbt_session=forged"}, "session expired or logged out: log in again"),
    ],
)
def test_no_or_bad_credential_is_401(client, headers, message):
    for method, path in (
        ("GET", "/api/v1/search?q=x"),
        ("GET", "/api/v1/preferences"),
        ("DELETE", "/api/v1/me"),
        ("GET", "/api/v1/images/1/thumbnail"),
    ):
        response = client.request(method, path, headers=headers)
        assert (response.status_code, response.json()) == (401, {"error": message})


def test_search_returns_the_engines_personalised_results(client, state, account):
    name, _, headers = account()
    state.engine.prefer(name, Q, 5, 9)
    response = search(client, headers, k=7)
    results = response.json()["results"]
    assert [r["rank"] for r in results] == list(range(1, 8))
    assert set(results[0]) == {"id", "rank", "score", "similarity", "p_next", "thumbnail"}
    assert results[0]["thumbnail"] == client.app.url_path_for("thumbnail", image_id=results[0]["id"])
    thumbnail = client.get(results[0]["thumbnail"], headers=headers)
    assert (thumbnail.status_code, thumbnail.headers["content-type"]) == (200, "image/jpeg")
    direct = state.engine.search(Q, name, 7)  # the one-at-a-time path, no HTTP, no batcher
    assert [r["id"] for r in results] == [h.id for h in direct]
    assert [r["score"] for r in results] == pytest.approx([h.score for h in direct], abs=1e-6)


@pytest.mark.parametrize(
    "params, status, message",
    [
        ({"q": Q, "k": 0}, 400, "k must be between 1 and 100, got 0"),
        ({"q": Q, "k": 101}, 400, "k must be between 1 and 100, got 101"),
        ({"q": "   ", "k": 3}, 400, "a search needs query text, got q='   '"),
        ({"q": "", "k": 3}, 422, "q: string should have at least 1 character, got ''"),
        ({"k": 3}, 422, "q is required"),
        (
            {"q": Q, "k": "many"},
            422,
            "k: input should be a valid integer, unable to parse string as an integer, got 'many'",
        ),
        ({"q": "x" * 501}, 422, "q: string should have at most 500 characters, got '" + "x" * 501 + "'"),
    ],
)
def test_bad_search_is_a_json_error_naming_the_value(client, account, params, status, message):
    _, _, headers = account()
    response = client.get("/api/v1/search", params=params, headers=headers)
    assert (response.status_code, response.json()) == (status, {"error": message})


def test_preferences_rankings_feedback_are_recorded_and_listed(client, account):
    _, _, headers = account()
    pair = client.post("/api/v1/preferences", json={"query": Q, "preferred": 3, "rejected": 4}, headers=headers)
    ranking = client.post("/api/v1/rankings", json={"query": Q, "images": [7, 2, 9]}, headers=headers)
    feedback = client.post(
        "/api/v1/feedback", json={"query": "a blue star", "good": [1], "bad": [2, 8]}, headers=headers
    )
    assert [r.status_code for r in (pair, ranking, feedback)] == [201, 201, 201]
    assert re.fullmatch(r"pair-\d+", pair.json()["id"]) and re.fullmatch(r"ranking-\d+", ranking.json()["id"])
    listed = client.get("/api/v1/preferences", headers=headers).json()["preferences"]
    assert [r["id"] for r in listed] == [feedback.json()["id"], ranking.json()["id"], pair.json()["id"]]  # newest first
    assert (listed[2]["preferred"], listed[2]["rejected"], listed[1]["images"]) == (3, 4, [7, 2, 9])
    assert (listed[0]["query"], listed[0]["good"], listed[0]["bad"]) == ("a blue star", [1], [2, 8])


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        (
            "/api/v1/preferences",
            {"query": Q, "preferred": 3, "rejected": 99999},
            400,
            "no image 99999 in collection 'default'",
        ),
        (
            "/api/v1/preferences",
            {"query": Q, "preferred": 3, "rejected": 3},
            400,
            "preferred and rejected are the same image 3",
        ),
        ("/api/v1/preferences", {"query": Q, "preferred": 3}, 422, "rejected is required"),
        (
            "/api/v1/preferences",
            {"query": "", "preferred": 3, "rejected": 4},
            422,
            "query: string should have at least 1 character, got ''",
        ),
        (
            "/api/v1/preferences",
            {"query": Q, "preferred": "../../etc/passwd", "rejected": 4},
            422,
            "preferred: input should be a valid integer, unable to parse string as an integer, got '../../etc/passwd'",
        ),
        (
            "/api/v1/rankings",
            {"query": Q, "images": [3]},
            422,
            "images: list should have at least 2 items after validation, not 1, got [3]",
        ),
        ("/api/v1/feedback", {"query": Q, "good": [3], "bad": [3]}, 400, "images [3] are marked both good and bad"),
        ("/api/v1/feedback", {"query": Q}, 400, "feedback needs at least one good or bad image, got none"),
    ],
)
def test_bad_preference_is_a_json_error_naming_the_value(client, account, path, body, status, message):
    _, _, headers = account()
    response = client.post(path, json=body, headers=headers)
    assert (response.status_code, response.json()) == (status, {"error": message})


def test_malformed_json_is_422(client, account):
    _, _, headers = account()
    response = client.post(
        "/api/v1/preferences", content=b'{"query": ', headers={**headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"].startswith("malformed JSON body: ")


def test_body_and_lists_are_bounded(client, account):
    _, _, headers = account()
    response = client.post(
        "/api/v1/feedback", content=b"{" + b" " * 70_000 + b"}", headers={**headers, "Content-Type": "application/json"}
    )
    assert (response.status_code, response.json()) == (413, {"error": "request body larger than 65536 bytes"})
    response = client.post("/api/v1/rankings", json={"query": Q, "images": list(range(101))}, headers=headers)
    assert response.status_code == 422 and response.json()["error"].startswith(
        "images: list should have at most 100 items"
    )


def test_users_never_see_or_change_each_others_data(client, state, account):
    ann, _, ann_headers = account()
    bob, _, bob_headers = account()
    bob_before = ids(search(client, bob_headers))
    ann_before = ids(search(client, ann_headers))
    assert ann_before == bob_before  # nobody has preferences yet
    for loser in ann_before[:5]:  # ann strongly prefers her 10th result over her top 5
        assert (
            client.post(
                "/api/v1/preferences",
                json={"query": Q, "preferred": ann_before[9], "rejected": loser},
                headers=ann_headers,
            ).status_code
            == 201
        )
    assert ids(search(client, ann_headers)) != ann_before
    assert ids(search(client, bob_headers)) == bob_before
    assert client.get("/api/v1/preferences", headers=bob_headers).json() == {"preferences": []}
    ann_record = client.get("/api/v1/preferences", headers=ann_headers).json()["preferences"][0]["id"]
    response = client.delete(f"/api/v1/preferences/{ann_record}", headers=bob_headers)
    assert (response.status_code, response.json()) == (404, {"error": f"you have no preference {ann_record!r}"})
    assert len(client.get("/api/v1/preferences", headers=ann_headers).json()["preferences"]) == 5
    a, b = ann_before[9], ann_before[0]
    p_ann = client.get("/api/v1/compare", params={"q": Q, "a": a, "b": b}, headers=ann_headers).json()["p"]
    p_bob = client.get("/api/v1/compare", params={"q": Q, "a": a, "b": b}, headers=bob_headers).json()["p"]
    assert p_bob < 0.5 and p_ann > p_bob + 0.1, (p_ann, p_bob)  # ann's answers move her probability, not bob's


def test_deleting_a_preference_undoes_it(client, account):
    _, _, headers = account()
    before = ids(search(client, headers))
    created = client.post(
        "/api/v1/preferences", json={"query": Q, "preferred": before[-1], "rejected": before[0]}, headers=headers
    ).json()["id"]
    assert ids(search(client, headers)) != before
    assert client.delete(f"/api/v1/preferences/{created}", headers=headers).status_code == 204
    assert ids(search(client, headers)) == before
    assert client.get("/api/v1/preferences", headers=headers).json() == {"preferences": []}
    response = client.delete("/api/v1/preferences/pair-1;DROP", headers=headers)
    assert (response.status_code, response.json()) == (
        404,
        {"error": "no preference 'pair-1;DROP': ids look like pair-12, ranking-3 or feedback-4"},
    )


def test_duel_asks_a_new_pair_of_top_results_each_time(client, state, account):
    name, _, headers = account()
    asked = set()
    for _ in range(4):
        top = ids(search(client, headers, k=20))  # the user's current top 20: it moves as they answer
        pair = client.get("/api/v1/duel", params={"q": Q}, headers=headers).json()
        a, b = pair["a"], pair["b"]
        assert a != b and a in top and b in top and frozenset((a, b)) not in asked
        asked.add(frozenset((a, b)))
        client.post("/api/v1/preferences", json={"query": Q, "preferred": a, "rejected": b}, headers=headers)
    assert len(set().union(*asked)) == 8  # each duel showed two images not shown before


def test_compare_is_a_probability(client, account):
    _, _, headers = account()
    p_ab = client.get("/api/v1/compare", params={"q": Q, "a": 3, "b": 4}, headers=headers).json()["p"]
    p_ba = client.get("/api/v1/compare", params={"q": Q, "a": 4, "b": 3}, headers=headers).json()["p"]
    assert 0 < p_ab < 1 and p_ab + p_ba == pytest.approx(1)
    response = client.get("/api/v1/compare", params={"q": Q, "a": 3, "b": 77777}, headers=headers)
    assert (response.status_code, response.json()) == (400, {"error": "no image 77777 in collection 'default'"})


def test_thumbnails_are_cached_jpegs_by_id_and_404_otherwise(client, state, home, account):
    _, _, headers = account()
    response = client.get("/api/v1/images/5/thumbnail", headers=headers)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.format == "JPEG" and max(picture.size) <= 256
    assert (state.thumbnails.folder / "5.jpg").read_bytes() == response.content
    for bad in ("99999", "..%2F..%2Fclipbt.db", "-1"):
        response = client.get(f"/api/v1/images/{bad}/thumbnail", headers=headers)
        assert response.status_code in (404, 422), bad
    assert client.get("/api/v1/images/99999/thumbnail", headers=headers).json() == {
        "error": "no image 99999 in collection 'default'"
    }


def test_an_image_without_its_file_gets_the_placeholder(client, state, account):
    _, _, headers = account()
    image = state.store.image(11)
    moved = image.uri + ".away"
    import os

    os.rename(image.uri, moved)
    try:
        response = client.get("/api/v1/images/11/thumbnail", headers=headers)
    finally:
        os.rename(moved, image.uri)
    assert response.status_code == 200 and response.content == placeholder(256)
    assert not (state.thumbnails.folder / "11.jpg").exists()  # not cached: the file may come back


def test_revoked_token_is_refused_at_once(client, state, account):
    name, _, headers = account()
    assert client.get("/api/v1/me", headers=headers).json() == {"user": name, "csrf": None}
    assert state.store.revoke_tokens(name) == 1
    assert client.get("/api/v1/me", headers=headers).status_code == 401


def test_delete_me_removes_every_trace(client, state, account):
    name, password, headers = account()
    client.post("/api/v1/preferences", json={"query": Q, "preferred": 3, "rejected": 4}, headers=headers)
    client.post("/api/v1/feedback", json={"query": Q, "good": [5]}, headers=headers)
    response = client.delete("/api/v1/me", headers=headers)
    assert response.json() == {"user": name, "pairs": 1, "rankings": 0, "feedback": 1}
    assert name not in state.store.users() and name not in state.store.accounts()
    assert client.get("/api/v1/me", headers=headers).status_code == 401
    assert client.post("/api/v1/login", json={"name": name, "password": password}).status_code == 401


def _login(client, name, password, **headers):
    return client.post("/api/v1/login", json={"name": name, "password": password}, headers=headers)


def test_session_cookie_is_httponly_lax_and_changes_need_csrf(client, account):
    name, password, _ = account()
    response = _login(client, name, password)
    assert response.status_code == 200
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    csrf = response.json()["csrf"]
    assert client.get("/api/v1/me").json() == {"user": name, "csrf": csrf}
    body = {"query": Q, "preferred": 3, "rejected": 4}
    origin = "http://testserver"
    for headers, message in [
        ({}, "cross-site check failed: a cookie-authenticated change needs an Origin header"),
        (
            {"Origin": "https://evil.example", "X-CSRF-Token": csrf},
            "cross-site request refused: origin https://evil.example is not this server",
        ),
        ({"Origin": origin}, "missing or wrong X-CSRF-Token header (GET /api/v1/me gives it)"),
        (
            {"Origin": origin, "X-CSRF-Token": "0" * 32},
            "missing or wrong X-CSRF-Token header (GET /api/v1/me gives it)",
        ),
    ]:
        response = client.post("/api/v1/preferences", json=body, headers=headers)
        assert (response.status_code, response.json()) == (403, {"error": message})
    assert client.get("/api/v1/preferences").json() == {"preferences": []}
    assert (
        client.post("/api/v1/preferences", json=body, headers={"Origin": origin, "X-CSRF-Token": csrf}).status_code
        == 201
    )
    assert client.post("/api/v1/logout", headers={"Origin": origin, "X-CSRF-Token": csrf}).status_code == 204
    client.cookies.clear()
    assert client.get("/api/v1/me").status_code == 401


def test_login_from_another_site_is_refused(client, account):
    name, password, _ = account()
    response = _login(client, name, password, Origin="https://evil.example")
    assert response.status_code == 403
    client.cookies.clear()


def test_failed_logins_are_rate_limited(client, state, account):
    name, password, _ = account()
    state.limiter = LoginLimiter(failures=3, window_s=300)  # forget earlier tests' failures from this address
    for _ in range(3):
        response = _login(client, name, "wrong")
        assert (response.status_code, response.json()) == (401, {"error": f"wrong name or password for {name!r}"})
    response = _login(client, name, password)  # even the right password, until the window passes
    assert response.status_code == 429 and response.json()["error"].startswith(f"too many failed logins for {name!r}")
    assert int(response.headers["Retry-After"]) > 0
    state.limiter = LoginLimiter(failures=3, window_s=300)
    client.cookies.clear()


def test_https_only_marks_the_cookie_secure(home):
    with TestClient(create_app(ServeConfig(home=home, https_only=True)), base_url="https://testserver") as client:
        client.app.state.serve.store.add_account("secure-sam", "pw")
        cookie = _login(client, "secure-sam", "pw").headers["set-cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie


def test_no_password_or_token_is_stored_in_clear(client, state, home):
    state.store.add_account("clear-check", "hunter2-unique-password")
    _, token = state.store.create_token("clear-check")
    session = state.store.create_session("clear-check", 60)
    raw = b"".join(path.read_bytes() for path in home.glob("clipbt.db*"))
    for secret in ("hunter2-unique-password", token, session):
        assert secret.encode() not in raw
    assert state.store.token_user(token) == "clear-check" and state.store.session_user(session) == "clear-check"


def test_batcher_answers_concurrent_searches_in_batches_as_one_at_a_time(state):
    engine = state.engine
    engine.prefer("batch-ann", Q, 3, 4)
    engine.prefer("batch-bob", "a blue star", 8, 2)
    requests = [
        SearchRequest(q, user, k)
        for q in (Q, "a blue star", "a green square")
        for user in (None, "batch-ann", "batch-bob", "nobody")
        for k in (1, 5)
    ]
    batcher = SearchBatcher(engine.search_many, max_batch=64, window_s=0.05)
    batcher.start()
    try:

        async def all_at_once(requests):
            return await asyncio.gather(*(batcher.search(r) for r in requests), return_exceptions=True)

        batched = asyncio.run(all_at_once(requests))
        bad = asyncio.run(all_at_once([SearchRequest(Q, None, 0), SearchRequest(Q, None, 2)]))
    finally:
        batcher.stop()
    assert batcher.batches < len(requests) + 3 and batcher.largest > 1
    assert batcher.searches == len(requests) + 2
    for request, hits in zip(requests, batched):
        assert [h.id for h in hits] == [h.id for h in engine.search(request.query, request.user, request.k)]
    assert str(bad[0]) == "k must be a whole number >= 1, got 0" and len(bad[1]) == 2  # a bad request fails alone


def test_cli_accounts_and_tokens(tmp_path):
    from engine.cli import main

    runner = CliRunner()
    home = ["--home", str(tmp_path)]
    added = runner.invoke(main, [*home, "users", "add", "cli-ann", "--password-stdin"], input="s3cret\n")
    assert (added.exit_code, added.output) == (0, "created account 'cli-ann' with a web password\n")
    again = runner.invoke(main, [*home, "users", "add", "cli-ann"])
    assert again.exit_code == 1 and "account 'cli-ann' already exists" in again.output
    created = runner.invoke(main, [*home, "tokens", "create", "cli-ann"])
    assert created.exit_code == 0
    token = created.stdout.strip()
    assert created.stdout.count("\n") == 1 and token.startswith("cbt_") and len(token) > 40
    runner.invoke(main, [*home, "tokens", "create", "cli-ann"])
    with Store.open(home=tmp_path) as store:
        assert store.token_user(token) == "cli-ann" and store.check_password("cli-ann", "s3cret")
        first = store.tokens("cli-ann")[0]["id"]
    revoked = runner.invoke(main, [*home, "tokens", "revoke", "cli-ann", "--id", str(first)])
    assert (revoked.exit_code, revoked.output) == (0, "revoked 1 token of 'cli-ann'\n")
    unknown = runner.invoke(main, [*home, "tokens", "create", "nobody"])
    assert (unknown.exit_code, unknown.output) == (
        1,
        "Error: no account 'nobody': create it with `clipbt users add nobody`\n",
    )
    with Store.open(home=tmp_path) as store:
        assert store.token_user(token) is None and len(store.tokens("cli-ann")) == 1
        store.create_session("cli-ann", 60)
    deleted = runner.invoke(main, [*home, "users", "delete", "cli-ann"])
    assert deleted.exit_code == 0, deleted.output
    with Store.open(home=tmp_path) as store:
        assert store.accounts() == []
        for table in ("accounts", "api_tokens", "web_sessions"):
            assert store._fetch_direct(f"SELECT count(*) FROM {table}", []) == [(0,)]


def test_every_response_carries_the_security_headers(client, account):
    _, _, headers = account()
    responses = [
        client.get("/healthz"),
        client.get("/"),
        client.get("/api/v1/search", params={"q": Q}),  # 401
        search(client, headers, k=3),
        client.get("/api/v1/images/1/thumbnail", headers=headers),
    ]
    for response in responses:
        assert response.headers["x-content-type-options"] == "nosniff", response.url
        assert response.headers["referrer-policy"] == "same-origin", response.url
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"], response.url
        assert len(response.headers.get_list("content-security-policy")) == 1, response.url


def test_images_of_another_collection_are_unknown_here_and_their_paths_stay_private(client, state, account):
    import numpy as np

    from storage.records import ImageRecord

    _, _, headers = account()
    served = state.engine.collection
    other = state.store.get_or_create_collection("private", served.model, served.pretrained, served.dim)
    secret = "/srv/secret/holiday-photo.png"
    (foreign,) = state.store.add_images(
        other, [ImageRecord(secret, "ab" * 32, 8, 8)], np.ones((1, served.dim), np.float32)
    )
    answers = [
        client.get(f"/api/v1/images/{foreign}/thumbnail", headers=headers),
        client.get("/api/v1/compare", params={"q": Q, "a": 3, "b": foreign}, headers=headers),
        client.post("/api/v1/preferences", json={"query": Q, "preferred": 3, "rejected": foreign}, headers=headers),
    ]
    assert [a.status_code for a in answers] == [404, 400, 400]
    for answer in answers:
        assert str(foreign) in answer.json()["error"], answer.text
        assert "secret" not in answer.text and "private" not in answer.text, answer.text


def test_stats_count_the_searches_and_their_batches(client, account):
    _, _, headers = account()
    assert client.get("/api/v1/stats").status_code == 401
    before = client.get("/api/v1/stats", headers=headers).json()
    search(client, headers, k=2)
    after = client.get("/api/v1/stats", headers=headers).json()
    assert after["searches"] == before["searches"] + 1 and after["batches"] == before["batches"] + 1
    assert after["largest_batch"] >= 1
