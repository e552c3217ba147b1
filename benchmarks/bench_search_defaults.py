"""Taste against relevance for MAP's prior and BT's step sizes on the demo: how the search defaults were chosen.

    python benchmarks/bench_search_defaults.py            # the demo's 2,000 images, about 15 s

Runs `clipbt demo` (2,000 world images, the shipped model, the demo user's 20 answers, asked with the default
prior) in a temporary data home, then searches "a red circle" for the demo user with each setting (MAP prior
precisions, then the step sizes of `--method bt`) and counts, in the top 10, the images that match the user's taste
(outlined shapes) and the ones still relevant to the query (red circles), from the world's ground truth. Writes
benchmarks/results/search_defaults.json.
"""

import json
import os
import tempfile
from pathlib import Path

from machine import describe  # benchmarks/machine.py

from engine.bt import AdaptConfig
from engine.bt.map import MapConfig
from engine.demo import DEMO_COLLECTION, DEMO_USER, DemoConfig, matches_taste, run_demo
from engine.search import Engine, SearchConfig
from indexer.world import read_collection
from storage import Store

MAP_PRIORS = (30.0, 60.0, 100.0, 120.0, 150.0, 200.0, 300.0)  # lambda of method "map" (beta 10)
BT_SETTINGS = [  # (lr, steps, beta) of method "bt"
    (0.05, 1, 1.0),
    (0.1, 3, 1.0),
    (0.2, 3, 1.0),
    (0.3, 3, 1.0),
    (0.3, 5, 1.0),
    (0.5, 3, 1.0),
    (0.5, 5, 1.0),
    (1.0, 5, 1.0),
    (0.5, 3, 5.0),
]
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    config = DemoConfig()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        run_demo(home, config, echo=lambda line: None, progress=False)
        truth = {os.path.abspath(p): a for p, a in read_collection(home / DEMO_COLLECTION / "images")}
        with Store.open(home=home) as store:
            engine = Engine.open(store, DEMO_COLLECTION)
            settings = [
                ({"prior_precision": lam}, SearchConfig(map=MapConfig(prior_precision=lam))) for lam in MAP_PRIORS
            ]
            settings += [
                (
                    {"lr": lr, "steps": steps, "beta": beta},
                    SearchConfig(method="bt", adapt=AdaptConfig(lr, steps, beta)),
                )
                for lr, steps, beta in BT_SETTINGS
            ]
            for setting, search in settings:
                hits = engine.search(config.query, user=DEMO_USER, k=config.k, config=search)
                attrs = [truth[h.path] for h in hits]
                row = {
                    "method": search.method,
                    **setting,
                    "taste": sum(matches_taste(a) for a in attrs),
                    "relevant": sum(a.colour == "red" and a.shape == "circle" for a in attrs),
                }
                rows.append(row)
                print(
                    f"{search.method:>3} {', '.join(f'{k} {v:g}' for k, v in setting.items()):<28} "
                    f"taste {row['taste']:>2}/10  relevant {row['relevant']:>2}/10"
                )
    out = {
        "query": config.query,
        "images": config.images,
        "questions": config.questions,
        "k": config.k,
        "defaults": {
            "map": {"prior_precision": MapConfig().prior_precision, "beta": MapConfig().beta},
            "bt": {"lr": AdaptConfig().lr, "steps": AdaptConfig().steps, "beta": AdaptConfig().beta},
        },
        "machine": describe(),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_defaults.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
