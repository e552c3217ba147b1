"""The accounts part of the Store (for `clipbt serve`): Argon2 password hashes, API tokens and web sessions kept only as SHA-256 hashes."""

import hashlib
import secrets
from datetime import timedelta

import sqlalchemy as sa

from storage import _schema as S
from storage._sql import _now, _utc
from storage.errors import AccountExistsError, StoreError, UnknownAccountError

TOKEN_PREFIX = "cbt_"  # API tokens look like cbt_<43 url-safe characters>, 256 random bits


def secret_hash(secret: str) -> str:
    """The SHA-256 hex digest under which a random token or session secret is stored (never the secret)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _hasher():
    try:
        from argon2 import PasswordHasher
    except ModuleNotFoundError as exc:
        raise StoreError(f"passwords need argon2-cffi ({exc}): pip install 'clipbt[serve]'") from None
    return PasswordHasher()


def _verify(hasher, stored: str, password: str) -> bool:
    from argon2.exceptions import InvalidHashError, VerificationError

    try:
        return hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


class AccountsMixin:
    """Accounts (one per preference user, deleted with it), their API tokens and web sessions."""

    def add_account(self, name: str, password: str | None = None) -> None:
        """Create the account `name` (and its preference user if new); `password` enables web login."""
        if password is not None and not password:
            raise StoreError("a password cannot be empty: leave it out for an API-token-only account")
        hashed = None if password is None else _hasher().hash(password)
        with self._write() as conn:
            uid = self._user_id(conn, name, create=True)
            if conn.execute(sa.select(S.accounts.c.id).where(S.accounts.c.user_id == uid)).first():
                raise AccountExistsError(
                    f"account {name!r} already exists: remove it with `clipbt users delete {name}`"
                )
            conn.execute(S.accounts.insert().values(user_id=uid, password_hash=hashed, created=_now()))

    def accounts(self) -> list[str]:
        """Every account name, sorted."""
        with self._read() as conn:
            return list(
                conn.execute(
                    sa.select(S.users.c.name)
                    .join(S.accounts, S.accounts.c.user_id == S.users.c.id)
                    .order_by(S.users.c.name)
                ).scalars()
            )

    def check_password(self, name: str, password: str) -> bool:
        """Whether `password` is the account's; False for an unknown account or one without a password."""
        hasher = _hasher()
        with self._read() as conn:
            stored = conn.execute(
                sa.select(S.accounts.c.password_hash)
                .join(S.users, S.users.c.id == S.accounts.c.user_id)
                .where(S.users.c.name == name)
            ).scalar()
        if stored is None:
            hasher.hash(password)  # as slow as a real check: timing does not tell which names exist
            return False
        return _verify(hasher, stored, password)

    def create_token(self, name: str) -> tuple[int, str]:
        """A new API token of account `name`: (its id, the token). Only its hash is stored."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._write() as conn:
            token_id = conn.execute(
                S.api_tokens.insert()
                .values(account_id=self._account_id(conn, name), token_hash=secret_hash(token), created=_now())
                .returning(S.api_tokens.c.id)
            ).scalar_one()
        return token_id, token

    def tokens(self, name: str) -> list[dict]:
        """The account's tokens as {"id", "created"} (the tokens themselves are not kept)."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(S.api_tokens.c.id, S.api_tokens.c.created)
                .where(S.api_tokens.c.account_id == self._account_id(conn, name))
                .order_by(S.api_tokens.c.id)
            ).all()
        return [{"id": r.id, "created": _utc(r.created).isoformat()} for r in rows]

    def revoke_tokens(self, name: str, token_id: int | None = None) -> int:
        """Delete one token (by id) or every token of account `name`; returns how many went."""
        with self._write() as conn:
            query = S.api_tokens.delete().where(S.api_tokens.c.account_id == self._account_id(conn, name))
            if token_id is not None:
                query = query.where(S.api_tokens.c.id == token_id)
            removed = conn.execute(query).rowcount
        if token_id is not None and not removed:
            raise UnknownAccountError(
                f"account {name!r} has no token {token_id}: list them with `clipbt tokens list {name}`"
            )
        return removed

    def token_user(self, token: str) -> str | None:
        """The account name a token belongs to, or None (one indexed SELECT, straight to the driver)."""
        rows = self._fetch_direct(
            "SELECT u.name FROM api_tokens t JOIN accounts a ON a.id = t.account_id "
            "JOIN users u ON u.id = a.user_id WHERE t.token_hash = ?",
            [secret_hash(token)],
        )
        return rows[0][0] if rows else None

    def create_session(self, name: str, lifetime_s: float) -> str:
        """A new web session of account `name` for `lifetime_s` seconds: its secret (the cookie)."""
        secret = secrets.token_urlsafe(32)
        with self._write() as conn:
            conn.execute(S.web_sessions.delete().where(S.web_sessions.c.expires < _now()))
            conn.execute(
                S.web_sessions.insert().values(
                    account_id=self._account_id(conn, name),
                    session_hash=secret_hash(secret),
                    expires=_now() + timedelta(seconds=lifetime_s),
                )
            )
        return secret

    def session_user(self, secret: str) -> str | None:
        """The account name of a live (unexpired) web session, or None."""
        with self._read() as conn:
            row = conn.execute(
                sa.select(S.users.c.name, S.web_sessions.c.expires)
                .join(S.accounts, S.accounts.c.id == S.web_sessions.c.account_id)
                .join(S.users, S.users.c.id == S.accounts.c.user_id)
                .where(S.web_sessions.c.session_hash == secret_hash(secret))
            ).first()
        return row.name if row is not None and _utc(row.expires) > _now() else None

    def end_session(self, secret: str) -> None:
        """Forget a web session (logout)."""
        with self._write() as conn:
            conn.execute(S.web_sessions.delete().where(S.web_sessions.c.session_hash == secret_hash(secret)))

    def _account_id(self, conn: sa.Connection, name: str) -> int:
        found = conn.execute(
            sa.select(S.accounts.c.id).join(S.users, S.users.c.id == S.accounts.c.user_id).where(S.users.c.name == name)
        ).scalar()
        if found is None:
            raise UnknownAccountError(f"no account {name!r}: create it with `clipbt users add {name}`")
        return found
