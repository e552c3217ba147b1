"""The documented bounds of every input clipbt accepts, and the checks that enforce them the same way on SQLite and PostgreSQL."""

import math
import re
import unicodedata
from dataclasses import dataclass

from storage.errors import ClipbtError, InvalidUserError, UnknownImageError


class LimitError(ClipbtError, ValueError):
    """A number or a text is outside its documented bounds, or holds characters clipbt refuses."""


@dataclass(frozen=True)
class Limits:
    """The bounds of the README's table "Limits"; one instance, `LIMITS`, is what clipbt enforces."""

    k_max: int = 10_000  # images one search returns
    steps_max: int = 100  # BT gradient steps per search
    lr_max: float = 100.0  # BT step size, 0 <= lr <= lr_max
    beta_max: float = 1_000.0  # BT inverse temperature, 0 < beta <= beta_max
    batch_size_max: int = 65_536  # images encoded per batch by `clipbt index`
    shard_size_max: int = 10_000_000  # rows per shard written by `clipbt export-embeddings`
    query_max_chars: int = 1_000  # a query text, after stripping surrounding whitespace
    user_max_chars: int = 128  # a user name, after normalisation
    ranking_max_images: int = 100  # images in one ranking (at most 4,950 implied pairs)
    feedback_max_images: int = 100  # good + bad images in one feedback record (at most 2,500 pairs)
    user_max_pairs: int = 20_000  # a user's most recent pairs that adapt a search (older ones are kept, unused)
    import_max_line_bytes: int = 1_000_000  # one line of a `prefs import` file


LIMITS = Limits()
INT64_MAX = 2**63 - 1
MAX_STORED_ID = 2**31 - 1  # images.id is an INTEGER column: int4 on PostgreSQL, so no id is larger
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also accepts superscripts and other scripts


def check_text(value: str, what: str) -> str:
    """`value` unchanged, or LimitError when PostgreSQL could not store it: a NUL character or a
    lone surrogate (not encodable as UTF-8). Both databases get the same rule, before any write."""
    if "\x00" in value:
        raise LimitError(f"{what} contains a NUL character (\\x00), which cannot be stored: {value[:40]!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LimitError(
            f"{what} contains a lone surrogate {value[exc.start]!r} at character {exc.start}, "
            "which is not valid Unicode text"
        ) from None
    return value


def check_query_text(value, what: str = "query text") -> str:
    """A query text stripped of surrounding whitespace: non-empty, at most `query_max_chars`, storable."""
    if not isinstance(value, str) or not value.strip():
        raise LimitError(f"{what} must be non-empty text, got {value!r}")
    value = check_text(value.strip(), what)
    if len(value) > LIMITS.query_max_chars:
        raise LimitError(f"{what} is {len(value)} characters long; the maximum is {LIMITS.query_max_chars}")
    return value


def normalize_user(name) -> str:
    """A user name in its one stored form: Unicode NFC, surrounding whitespace removed; InvalidUserError
    when empty, longer than `user_max_chars`, or holding a control or invisible character (so that
    `alice`, `alice ` and `alice` + a zero-width space are the same user or refused, never three)."""
    if not isinstance(name, str):
        raise InvalidUserError(f"a user name is text, got {name!r}")
    try:
        check_text(name, "user name")
    except LimitError as exc:
        raise InvalidUserError(str(exc)) from None
    name = unicodedata.normalize("NFC", name).strip()
    if not name:
        raise InvalidUserError(f"a user name needs at least one visible character, got {name!r}")
    if len(name) > LIMITS.user_max_chars:
        raise InvalidUserError(f"user name is {len(name)} characters long; the maximum is {LIMITS.user_max_chars}")
    for position, char in enumerate(name):
        # Cc control, Cf format (zero-width space and joiners, bidi marks), Co/Cs/Cn private or
        # unassigned, Zl/Zp line breaks: invisible or ambiguous in a printed name.
        if unicodedata.category(char) in ("Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"):
            raise InvalidUserError(
                f"user name {name!r} contains the invisible or control character U+{ord(char):04X} "
                f"at position {position}; use visible characters only"
            )
    return name


def parse_image_id(value) -> int:
    """An image id from an int or a plain ASCII decimal string (no sign, no other digits) within
    int64; UnknownImageError otherwise. A str that is not such an id is a path, not an id: see
    `is_image_id`."""
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise UnknownImageError(f"an image id is a plain decimal number (0-9), got {value!r}")
        value = int(value)
    elif isinstance(value, bool) or not hasattr(value, "__index__"):
        raise UnknownImageError(f"an image id is an int, got {value!r}")
    value = int(value)
    if not 0 <= value <= INT64_MAX:
        raise UnknownImageError(f"image id {value} is outside the range of ids (0 to {INT64_MAX})")
    return value


def is_image_id(ref: str) -> bool:
    """Whether a str names an image by id: plain ASCII digits only (else it is a path)."""
    return bool(_DIGITS.fullmatch(ref))


def check_preference_size(kind: str, n_good: int, n_bad: int = 0) -> None:
    """InvalidPreferenceError when one ranking (`n_good` images) or one feedback (`n_good` + `n_bad`)
    names more images than documented: what one record implies stays bounded."""
    from storage.errors import InvalidPreferenceError

    if kind == "ranking" and n_good > LIMITS.ranking_max_images:
        raise InvalidPreferenceError(
            f"a ranking holds at most {LIMITS.ranking_max_images} images, got {n_good}: "
            "record the top of it, or several rankings"
        )
    if kind == "feedback" and n_good + n_bad > LIMITS.feedback_max_images:
        raise InvalidPreferenceError(
            f"one feedback marks at most {LIMITS.feedback_max_images} images, got {n_good} good and {n_bad} bad"
        )


def check_count(value, name: str, low: int, high: int) -> int:
    """A whole number low <= value <= high, or LimitError naming the bound."""
    if isinstance(value, bool) or not hasattr(value, "__index__") or not low <= int(value) <= high:
        raise LimitError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(value)


def check_range(value, name: str, low: float, high: float, low_open: bool = False) -> float:
    """A finite number in [low, high] ((low, high] with `low_open`), or LimitError."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    inside = math.isfinite(number) and (number > low if low_open else number >= low) and number <= high
    if isinstance(value, bool) or not inside:
        bracket = "(" if low_open else "["
        raise LimitError(f"{name} must be a number in {bracket}{low:g}, {high:g}], got {value!r}")
    return number


def check_adaptation(lr, steps, beta) -> None:
    """The BT hyper-parameters within their documented bounds."""
    check_range(lr, "lr", 0.0, LIMITS.lr_max)
    check_count(steps, "steps", 0, LIMITS.steps_max)
    check_range(beta, "beta", 0.0, LIMITS.beta_max, low_open=True)
