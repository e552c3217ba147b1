"""Typed errors of clipbt: every deliberate failure is a ClipbtError whose message names the bad value."""


class ClipbtError(Exception):
    """Base of every error clipbt raises on purpose; the CLI prints it as `Error: <message>`."""
