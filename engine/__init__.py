"""clipbt's engine: Bradley-Terry query adaptation, personalized search and preference ranking."""

import importlib

_EXPORTS = {  # module -> the names imported from it on first use (engine.bt loads torch)
    "engine.bt": (
        "AdaptConfig",
        "AdaptationInputError",
        "adapt",
        "adapt_batched",
        "adapt_plackett_luce",
        "average_vector",
        "plackett_luce_gradient",
        "plackett_luce_loss",
        "positive_only",
        "preference_gradient",
        "preference_loss",
        "preference_probability",
        "rocchio",
        "similarity",
    ),
    "engine.ranking": ("RankConfig", "rank_candidates"),
    "engine.search": ("Engine", "Hit", "SearchConfig", "SearchRequest"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    """Import a public name from its module when it is first asked for (PEP 562)."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value
