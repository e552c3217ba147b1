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

__all__ = [
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
]
