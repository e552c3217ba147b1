"""clipbt's engine: Bradley-Terry query adaptation, personalized search and preference ranking."""

from engine.bt import (
    AdaptConfig,
    AdaptationInputError,
    adapt,
    adapt_batched,
    adapt_plackett_luce,
    average_vector,
    plackett_luce_gradient,
    plackett_luce_loss,
    positive_only,
    preference_gradient,
    preference_loss,
    preference_probability,
    rocchio,
    similarity,
)
from engine.ranking import RankConfig, rank_candidates
from engine.search import Engine, Hit, SearchConfig, SearchRequest

__all__ = [
    "AdaptConfig",
    "Engine",
    "Hit",
    "RankConfig",
    "SearchConfig",
    "SearchRequest",
    "rank_candidates",
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
]
