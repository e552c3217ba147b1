"""Shared pieces of the BT math: its configuration, its input error, the logistic function and the hyper-parameter check (numpy only)."""

from dataclasses import dataclass

import numpy as np

from storage.errors import ClipbtError
from storage.numeric import logistic  # noqa: F401  (re-exported: the BT math uses this one)

GLOBAL_QUALITY_QUERY = "An amazing and high-quality image"  # the paper's section 3.1 query


class AdaptationInputError(ClipbtError, ValueError):
    """An input to the BT math has the wrong shape, a non-finite value or a zero vector."""


@dataclass(frozen=True)
class AdaptConfig:
    """Hyper-parameters of BT adaptation; defaults are the ones clipbt searches with."""

    # lr and steps: measured on the demo world (README, "Choosing the search defaults"): larger
    # steps buy taste at the price of the query's meaning.
    lr: float = 0.5  # gradient-descent step size epsilon
    steps: int = 3  # number of gradient steps T (the paper uses 1, and 5-7 for generation)
    beta: float = 1.0  # inverse temperature of the BT probability (1 = the paper's eq. 2)
    normalize: bool = False  # project x back onto the unit sphere after every step


def check_hyper(lr: float, steps: int, beta: float) -> None:
    if not np.isfinite(lr) or lr < 0:
        raise AdaptationInputError(f"lr must be a finite number >= 0, got {lr}")
    if int(steps) != steps or steps < 0:
        raise AdaptationInputError(f"steps must be a whole number >= 0, got {steps}")
    if not np.isfinite(beta) or beta <= 0:
        raise AdaptationInputError(f"beta must be a finite number > 0, got {beta}")
