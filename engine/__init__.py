"""clipbt's engine: Bradley-Terry query adaptation, personalized search and preference ranking."""

import lazy_loader

# The public names, each imported from its module on first use (engine.bt and engine.search load torch).
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "bt": (
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
        "ranking": ("RankConfig", "rank_candidates"),
        "search": ("Engine", "Hit", "SearchConfig", "SearchRequest"),
    },
)
