"""The accounts part of the Store on SQLite and PostgreSQL: hashes only, tokens, sessions, cascades, deleting one's own records."""

import pytest

from storage.errors import AccountExistsError, UnknownAccountError
from storage.records import ImageRecord


def _two_images(store) -> list[int]:
    import numpy as np

    coll = store.create_collection("c", "m", "p", 4)
    records = [ImageRecord(f"/x/{i}.png", f"{i:064x}", 8, 8) for i in range(3)]
    return store.add_images(coll.id, records, np.eye(3, 4, dtype=np.float32))


def test_accounts_tokens_and_sessions(store):
    store.add_account("ann", "pw-1")
    store.add_account("tok")  # tokens only
    with pytest.raises(AccountExistsError, match="account 'ann' already exists"):
        store.add_account("ann", "other")
    assert store.accounts() == ["ann", "tok"] and "ann" in store.users()
    assert store.check_password("ann", "pw-1")
    assert not store.check_password("ann", "pw-2") and not store.check_password("tok", "anything")
    assert not store.check_password("nobody", "pw-1")
    (id1, t1), (id2, t2) = store.create_token("ann"), store.create_token("ann")
    assert t1 != t2 and store.token_user(t1) == store.token_user(t2) == "ann"
    assert store.token_user(t1 + "x") is None
    assert [t["id"] for t in store.tokens("ann")] == [id1, id2]
    assert store.revoke_tokens("ann", id1) == 1 and store.token_user(t1) is None and store.token_user(t2) == "ann"
    with pytest.raises(UnknownAccountError, match="account 'ann' has no token"):
        store.revoke_tokens("ann", id1)
    with pytest.raises(UnknownAccountError, match="no account 'bob'"):
        store.create_token("bob")
    live, expired = store.create_session("ann", 60), store.create_session("ann", -1)
    assert store.session_user(live) == "ann" and store.session_user(expired) is None
    store.end_session(live)
    assert store.session_user(live) is None


def test_deleting_the_user_removes_account_tokens_and_sessions(store):
    store.add_account("ann", "pw")
    _, token = store.create_token("ann")
    session = store.create_session("ann", 60)
    store.delete_user("ann")
    assert store.accounts() == [] and store.token_user(token) is None and store.session_user(session) is None
    for table in ("accounts", "api_tokens", "web_sessions"):
        assert store._fetch_direct(f"SELECT count(*) FROM {table}", []) == [(0,)]


def test_delete_preference_touches_only_ones_own(store):
    a, b, c = _two_images(store)
    pair = store.add_pair("ann", "q", a, b)
    ranking = store.add_ranking("ann", "q", [a, b, c])
    feedback = store.add_feedback("bob", "q", [a], [c])
    version = store.preference_version("ann")
    assert not store.delete_preference("bob", "pair", pair)
    assert not store.delete_preference("ann", "feedback", feedback)
    assert not store.delete_preference("ann", "feedback", ranking)  # a ranking id is not a feedback id
    assert store.preference_version("ann") == version
    assert store.delete_preference("ann", "ranking", ranking) and store.delete_preference("ann", "pair", pair)
    assert store.pairs("ann") == [] and store.preference_version("ann") != version
    assert len(store.pairs("bob")) == 1
