"""Bradley-Terry query adaptation (Gallego 2023, eqs. 1-4): the reference math and its fast serving forms.

    common     AdaptConfig, AdaptationInputError, `logistic`, the paper's global query (numpy)
    reference  eqs. 1-4 and `adapt`, the baselines, Plackett-Luce: the reference (torch or numpy)
    span       `PairSet` and `adapt_many`, the serving form: steps on the pairs' coefficients (numpy only)
    batched    `adapt_batched`, the padded batch form on any torch device
    map        `map_adapt_many`, the posterior mode under a Gaussian prior centred on the query (numpy only)
    threads    thread counts around the small products

The fast forms are tested against `reference.adapt` (tests/test_bt.py).
"""

import lazy_loader

# Each name is imported from its module on first use: the span form loads no torch.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "common": ["AdaptConfig", "AdaptationInputError", "GLOBAL_QUALITY_QUERY", "logistic"],
        "reference": [
            "adapt",
            "adapt_plackett_luce",
            "average_vector",
            "pad_rankings",
            "plackett_luce_gradient",
            "plackett_luce_loss",
            "positive_only",
            "preference_gradient",
            "preference_loss",
            "preference_probability",
            "rocchio",
            "similarity",
        ],
        "span": ["PairSet", "adapt_many"],
        "batched": ["adapt_batched"],
        "map": ["MapConfig", "MapFit", "map_adapt_many", "map_adapt_reference", "map_fit", "score_variance"],
        "threads": ["numpy_blas_on_one_thread", "one_torch_thread"],
    },
)
