"""The preference-classification protocol of Gallego 2023, section 3.1: split, seeded draws, methods, tuning, report."""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine import bt
from engine.bench.datasets import EncodedDataset
from engine.bt import logistic
from storage.errors import ClipbtError

METHODS = (
    "original",
    "positive",
    "bt",
    "map",
    "bt_margin",
    "bt_selected",
    "rocchio",
    "average_vector",
    "plackett_luce",
)

_BT_GRID = [
    {"lr": lr, "steps": s, "beta": b}
    for b in (1.0, 10.0, 100.0)
    for s in (1, 5)
    for lr in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
]
GRIDS = {  # the candidates tuning chooses from, per method, in order (a tie keeps the earlier one)
    "original": [{}],
    "positive": [{"lr": lr} for lr in (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)],
    "bt": _BT_GRID,
    # MAP: the prior's precision lambda and the BT temperature beta (only their balance and beta's scale matter)
    "map": [
        {"prior_precision": lam, "beta": b}
        for b in (1.0, 3.0, 10.0, 30.0, 100.0)
        for lam in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    ],
    "bt_margin": _BT_GRID,
    "bt_selected": [{**c, "keep": k} for k in (0.5, 0.25) for c in _BT_GRID],
    "rocchio": [
        {"alpha": 1.0, "beta": b, "gamma": g * b}
        for b in (0.25, 0.75, 2.0, 8.0, 32.0, 128.0, 512.0)
        for g in (0.2, 1.0, 3.0)
    ],
    "average_vector": [{}],
    "plackett_luce": [],  # not tuned: it takes the hyper-parameters chosen for bt (with 2 items PL is BT)
}


class PreferenceBenchError(ClipbtError):
    """The benchmark cannot run as asked: too few pairs for the sizes, or a bad setting."""


@dataclass(frozen=True)
class BenchConfig:
    """The protocol's knobs; defaults reproduce section 3.1 of the paper."""

    sizes: tuple[int, ...] = (0, 1, 2, 5, 10, 20, 50)  # training-set sizes N
    repeats: int = 10  # random training sets per N
    eval_size: int = 2000  # evaluation pairs (per user with per_user), or all the split leaves
    tune_size: int = 500  # tuning pairs held out beside the evaluation pairs (per user with per_user)
    tune_repeats: int = 3  # random training sets per N while tuning
    per_user: bool = False  # adapt to each user's pairs and average the accuracy over users
    seed: int = 0  # seeds the splits and every draw
    splits: int = 3  # evaluation/tuning/pool splits, each with its own seed, tuning and draws
    margin_b: float = 0.1  # bt_margin: b of the stable-preference weight 1 / (1 + exp((dS - b) / tau))
    margin_tau: float = 0.05  # bt_margin: tau of that weight
    methods: tuple[str, ...] = METHODS  # methods to run (plackett_luce only where rankings exist)

    def __post_init__(self):
        if not self.sizes or any(int(n) != n or n < 0 for n in self.sizes):
            raise PreferenceBenchError(f"sizes must be whole numbers >= 0, got {self.sizes}")
        for name in ("repeats", "eval_size", "tune_size", "tune_repeats", "splits"):
            if getattr(self, name) < 1:
                raise PreferenceBenchError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.margin_tau > 0:
            raise PreferenceBenchError(f"margin_tau must be > 0, got {self.margin_tau}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise PreferenceBenchError(f"unknown method(s) {unknown}; expected some of {', '.join(METHODS)}")


@dataclass
class BenchResult:
    """Accuracy of every method at every N (mean and spreads over splits and draws), and how it was obtained."""

    dataset: str
    # name -> {"N", "mean", "std" (over all splits x draws), "std_draws" (over the draws of a split, averaged
    # over splits), "std_splits" (of the splits' means)}; bt and map also "log_loss" and "ece" of their own
    # probabilities sigmoid(beta * margin) on the evaluation pairs
    methods: dict
    oracle: float | None  # Bayes-optimal accuracy on the evaluation pairs (simulated data only)
    hyperparameters: dict  # name -> the chosen candidate of GRIDS, one per split
    counts: dict  # pairs in each split, users used and skipped, ties skipped
    config: dict
    skipped: dict = field(default_factory=dict)  # method -> why it did not run
    command: str | None = None  # the command line that made it
    calibration: dict = field(default_factory=dict)  # name -> reliability bins at the largest N (`reliability`)

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A Markdown table: one row per method, one column per N, accuracy in percent as
        mean ± std over draws / std over splits."""
        sizes = next(iter(self.methods.values()))["N"]
        lines = ["| method | " + " | ".join(f"N={n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for name, row in self.methods.items():
            cells = [
                f"{100 * m:.1f} ± {100 * sd:.1f} / {100 * ss:.1f}"
                for m, sd, ss in zip(row["mean"], row["std_draws"], row["std_splits"])
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if self.oracle is not None:
            lines.append("| oracle (Bayes-optimal) | " + " | ".join(f"{100 * self.oracle:.1f}" for _ in sizes) + " |")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The two pair-handling ideas, as pure functions


def margin_weights(gap, b: float = 0.1, tau: float = 0.05):
    """Stable-preference pair weight w = 1 / (1 + exp((dS - b) / tau)) (stable-preference slides, step 1),
    dS = s(x, y1) - s(x, y2) the pair's score gap under the query (eq. 1). A pair the query already
    ranks right by more than b weighs little; a pair inside the margin, or ranked wrong, weighs ~1."""
    gap = np.asarray(gap, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, (gap - b) / tau))  # 1 / (1 + e^z), without overflow


def pair_quality(gap, diff_norm, beta: float = 1.0):
    """Informativeness of a pair: the norm of its own eq. 4 gradient at the query,
    ||beta (p - 1)(y1 - y2)|| = beta (1 - sigmoid(beta dS)) ||y1 - y2||. Large for pairs of clearly
    different images that the query does not yet rank right; ~0 for near-duplicates."""
    gap = np.asarray(gap, dtype=np.float64)
    return beta * np.exp(-np.logaddexp(0.0, beta * gap)) * np.asarray(diff_norm, dtype=np.float64)


def selection_weights(quality: np.ndarray, keep: float) -> np.ndarray:
    """Weights that make the mean loss over a row's N pairs equal the mean over its best ceil(keep N) pairs:
    N / k on the k highest-quality pairs of each row, 0 elsewhere. quality: (B, N)."""
    b, n = quality.shape
    k = max(1, math.ceil(keep * n))
    top = np.argsort(-quality, axis=1, kind="stable")[:, :k]
    w = np.zeros((b, n))
    np.put_along_axis(w, top, n / k, axis=1)
    return w


# ---------------------------------------------------------------------------------------------
# Split and draws


@dataclass
class _Part:
    """One user's split (the whole dataset is one part outside per-user mode): pair indices."""

    user: str | None
    eval: np.ndarray
    tune: np.ndarray
    pool: np.ndarray


def split(data: EncodedDataset, config: BenchConfig, index: int = 0) -> tuple[list[_Part], list[str]]:
    """Split `index` (seeded by config.seed and index) of each part (each user with per_user) into
    evaluation, tuning and training-pool pairs, whole groups at a time: tuning gets min(tune_size, 20%) of
    the part's pairs, evaluation min(eval_size, half of the rest), the pool all the others. The split does
    not depend on the sizes N; a part whose pool holds fewer than max(sizes) pairs is skipped. Returns the
    parts and the users skipped."""
    if config.per_user:
        if data.users is None:
            raise PreferenceBenchError("--per-user needs user ids, and this dataset has none")
        names = sorted(set(data.users.tolist()))
        members = [(u, np.flatnonzero(data.users == u)) for u in names]
    else:
        members = [(None, np.arange(len(data.preferred)))]
    need = max(config.sizes)
    parts, skipped = [], []
    for k, (user, idx) in enumerate(members):
        rng = np.random.default_rng([config.seed, 7, k] + ([index] if index else []))
        groups = np.unique(data.group[idx])
        order = rng.permutation(groups)
        n_tune = min(config.tune_size, len(idx) // 5)
        n_eval = min(config.eval_size, (len(idx) - n_tune) // 2)
        if n_tune < 1 or n_eval < 1:
            skipped.append(user)
            continue
        members_of = {g: [] for g in groups}
        for i in idx:
            members_of[data.group[i]].append(i)
        chosen, filled = {"eval": [], "tune": [], "pool": []}, {"eval": 0, "tune": 0}
        for g in order:
            bucket = "eval" if filled["eval"] < n_eval else "tune" if filled["tune"] < n_tune else "pool"
            chosen[bucket].append(np.array(members_of[g], dtype=np.int64))
            filled[bucket] = filled.get(bucket, 0) + len(members_of[g])
        part = _Part(
            user,
            *(
                np.sort(np.concatenate(chosen[b])) if chosen[b] else np.zeros(0, np.int64)
                for b in ("eval", "tune", "pool")
            ),
        )
        if len(part.pool) < need or len(part.tune) < 1:
            skipped.append(user)
            continue
        parts.append(part)
    if not parts:
        where = "any user" if config.per_user else "the dataset"
        raise PreferenceBenchError(
            f"{where} has too few pairs for sizes up to {need}: the training pool is what is left after 20% "
            f"for tuning and half the rest for evaluation (the largest part has {max(len(i) for _, i in members)} "
            "pairs); pass smaller --sizes"
        )
    return parts, skipped


def draw(pool: np.ndarray, n: int, seed: int, stage: int, repeat: int, part: int, split_index: int = 0) -> np.ndarray:
    """Training set `repeat` of size n from pool, a pure function of its arguments (stage 0: final, 1: tuning)."""
    rng = np.random.default_rng([seed, stage, n, repeat, part] + ([split_index] if split_index else []))
    return np.sort(rng.choice(pool, size=n, replace=False))


# ---------------------------------------------------------------------------------------------
# Methods on a batch of tasks


@dataclass
class _Batch:
    """T tasks (a training draw each) and B query rows to adapt, each row belonging to one task."""

    queries: np.ndarray  # (B, d) the queries before adaptation
    task: np.ndarray  # (B,) task of each query row
    train: np.ndarray  # (T, N) training pair indices of each task


def adapt(method: str, params: dict, data: EncodedDataset, batch: _Batch, config: BenchConfig) -> np.ndarray:
    """Adapted query rows (B, d) for `method` with `params` (one candidate of GRIDS)."""
    q, task, train = batch.queries, batch.task, batch.train
    if method == "original" or train.shape[1] == 0:
        return q.copy()
    pref, rej = data.images[data.preferred[train]], data.images[data.rejected[train]]  # (T, N, d)
    zero = np.zeros(q.shape[1], dtype=np.float32)
    if method in ("positive", "rocchio", "average_vector"):
        # These are affine in x: f(x) = a x + f(0), with a = 1, alpha, 0. f(0) is computed once per task.
        if method == "positive":
            a, offsets = 1.0, [bt.positive_only(zero, p, **params) for p in pref]
        elif method == "rocchio":
            a, offsets = params["alpha"], [bt.rocchio(zero, p, r, **params) for p, r in zip(pref, rej)]
        else:
            a, offsets = 0.0, [bt.average_vector(zero, p, r) for p, r in zip(pref, rej)]
        return a * q + np.stack(offsets)[task]
    if method == "plackett_luce":
        return _adapt_plackett_luce(params, data, batch)
    if method == "map":
        sets = [bt.PairSet.of(p, r) for p, r in zip(pref, rej)]
        return bt.map_adapt_many(q, [sets[t] for t in task], [None] * len(q), params["prior_precision"], params["beta"])
    return _adapt_bt(method, params, q, task, pref, rej, config)


def probability_scale(method: str, params: dict) -> float | None:
    """The beta of a method's own BT probability sigmoid(beta * (s(x', y1) - s(x', y2))), None for methods without one."""
    return params.get("beta") if method in ("bt", "map") else None


def _adapt_bt(method, params, q, task, pref, rej, config) -> np.ndarray:
    """bt, bt_margin, bt_selected through bt.adapt_batched, each query row with its task's N pairs."""
    lr, steps, beta = params["lr"], params["steps"], params["beta"]
    n = pref.shape[1]
    out = np.empty_like(q)
    chunk = max(1, 200_000 // n)  # rows per call: bounds the (rows * N, d) pair copies
    for start in range(0, len(q), chunk):
        rows = slice(start, start + chunk)
        qr, t = q[rows], task[rows]
        p, r = pref[t], rej[t]  # (b, N, d)
        weights = None
        if method != "bt":
            gap = np.einsum("bnd,bd->bn", p - r, qr)
            if method == "bt_margin":
                weights = margin_weights(gap, config.margin_b, config.margin_tau)
            else:
                quality = pair_quality(gap, np.linalg.norm(p - r, axis=2), beta)
                weights = selection_weights(quality, params["keep"])
            weights = weights.reshape(-1).astype(np.float32)
        owner = np.repeat(np.arange(len(qr)), n)
        out[rows] = bt.adapt_batched(
            qr,
            p.reshape(-1, p.shape[2]),
            r.reshape(-1, r.shape[2]),
            owner,
            lr=lr,
            steps=steps,
            beta=beta,
            weights=weights,
        )
    return out


def pl_rankings(data: EncodedDataset, train: np.ndarray) -> list[np.ndarray]:
    """The rankings a training draw reveals: per group, the images of its drawn pairs ordered by human rank
    (best first; equal ranks keep index order). Groups with fewer than 2 images give none."""
    images = np.concatenate([data.preferred[train], data.rejected[train]])
    groups = np.concatenate([data.group[train], data.group[train]])
    out = []
    for g in np.unique(groups):
        members = np.unique(images[groups == g])
        if len(members) >= 2:
            out.append(members[np.argsort(data.image_rank[members], kind="stable")])
    return out


def _adapt_plackett_luce(params, data, batch) -> np.ndarray:
    """Plackett-Luce over the rankings of each task's draw; one bt.adapt_plackett_luce call per distinct query row."""
    out = np.empty_like(batch.queries)
    for t in range(len(batch.train)):
        items, lengths = bt.pad_rankings([data.images[r] for r in pl_rankings(data, batch.train[t])])
        rows = np.flatnonzero(batch.task == t)
        unique, inverse = np.unique(batch.queries[rows], axis=0, return_inverse=True)
        adapted = np.stack(
            [
                bt.adapt_plackett_luce(u, items, lengths, lr=params["lr"], steps=params["steps"], beta=params["beta"])
                for u in unique
            ]
        )
        out[rows] = adapted[inverse.reshape(-1)]
    return out


# ---------------------------------------------------------------------------------------------
# The protocol


def _evaluate(
    data: EncodedDataset,
    parts: list[_Part],
    split_name: str,
    n: int,
    repeats: int,
    stage: int,
    config: BenchConfig,
    runs: dict[str, list[dict]],
    split_index: int = 0,
    probabilities: dict | None = None,
) -> dict[str, np.ndarray]:
    """Accuracy (candidates, repeats) of every method in `runs` (method -> candidates) at size n.

    Accuracy = share of the part's `split_name` pairs whose preferred image scores higher under the
    adapted query (a tie counts 1/2); with several parts (users) the mean over parts. When
    `probabilities` is a dict, the first candidate's probabilities that the preferred image wins
    (`probability_scale`) are appended to probabilities[method] for every evaluation pair."""
    shared = bool(np.all(data.queries == data.queries[:1]))
    queries, task, ev, qrow, trains, base = [], [], [], [], [], 0
    for r in range(repeats):
        for k, part in enumerate(parts):
            t = len(trains)
            trains.append(draw(part.pool, n, config.seed, stage, r, k, split_index))
            held = getattr(part, split_name)
            if shared:
                queries.append(data.queries[held[:1]])
                qrow.append(np.full(len(held), base))
            else:
                queries.append(data.queries[held])
                qrow.append(base + np.arange(len(held)))
            task.append(np.full(len(queries[-1]), t))
            base += len(queries[-1])
            ev.append(held)
    batch = _Batch(np.concatenate(queries), np.concatenate(task), np.stack(trains).reshape(len(trains), n))
    ev, qrow = np.concatenate(ev), np.concatenate(qrow)
    diff = data.images[data.preferred[ev]] - data.images[data.rejected[ev]]
    eval_task = batch.task[qrow]
    counts = np.bincount(eval_task, minlength=len(trains))
    out = {}
    for method, candidates in runs.items():
        acc = np.empty((len(candidates), repeats))
        for c, params in enumerate(candidates):
            adapted = adapt(method, params, data, batch, config)
            margin = np.einsum("ed,ed->e", adapted[qrow], diff)
            correct = (margin > 0) + 0.5 * (margin == 0)
            per_task = np.bincount(eval_task, weights=correct, minlength=len(trains)) / counts
            acc[c] = per_task.reshape(repeats, len(parts)).mean(axis=1)
            scale = probability_scale(method, params)
            if probabilities is not None and c == 0 and scale is not None:
                probabilities.setdefault(method, []).append(logistic(scale * margin.astype(np.float64)))
        out[method] = acc
    return out


def tune(
    data: EncodedDataset, parts: list[_Part], methods: list[str], config: BenchConfig, split_index: int = 0
) -> dict[str, dict]:
    """Choose each method's hyper-parameters without the evaluation pairs: every candidate of GRIDS is run
    through the same protocol with training draws from the pool (stage 1 seeds, tune_repeats per N) and
    scored on the tuning pairs; the best mean accuracy over all N > 0 wins (the earlier candidate on a tie)."""
    sizes = [n for n in config.sizes if n > 0]
    runs = {m: GRIDS[m] for m in methods if GRIDS[m]}
    if not sizes:
        return {m: runs[m][0] for m in runs}
    total = {m: np.zeros(len(c)) for m, c in runs.items()}
    for n in sizes:
        for m, acc in _evaluate(data, parts, "tune", n, config.tune_repeats, 1, config, runs, split_index).items():
            total[m] += acc.mean(axis=1)
    return {m: runs[m][int(np.argmax(total[m]))] for m in runs}


def run(data: EncodedDataset, config: BenchConfig = BenchConfig(), name: str = "dataset") -> BenchResult:
    """The whole protocol: split, tune on the tuning pairs, then every method on the same seeded draws."""
    with bt.one_torch_thread():
        return _run(data, config, name)


def _run(data: EncodedDataset, config: BenchConfig, name: str) -> BenchResult:
    skipped = {}
    methods = list(config.methods)
    if "plackett_luce" in methods and data.image_rank is None:
        methods.remove("plackett_luce")
        skipped["plackett_luce"] = "the dataset has pairs, not rankings"
    acc = {m: np.zeros((config.splits, len(config.sizes), config.repeats)) for m in methods}
    chosen_per_split, all_parts, oracles = [], [], []
    calibration = {}  # method -> per N, per split: probabilities of the preferred image
    probs_by_n = [{} for _ in config.sizes]
    for s in range(config.splits):
        parts, skipped_users = split(data, config, s)
        chosen = tune(data, parts, [m for m in methods if m != "plackett_luce"], config, s)
        if "plackett_luce" in methods:
            bt_params = chosen.get("bt") or tune(data, parts, ["bt"], config, s)["bt"]
            chosen["plackett_luce"] = {k: bt_params[k] for k in ("lr", "steps", "beta")}
        runs = {m: [chosen[m]] for m in methods}
        for i, n in enumerate(config.sizes):
            for m, a in _evaluate(data, parts, "eval", n, config.repeats, 0, config, runs, s, probs_by_n[i]).items():
                acc[m][s, i] = a[0]
        chosen_per_split.append(chosen)
        all_parts.append((parts, skipped_users))
        oracles.append(_oracle(data, parts, config))
    results = {}
    for m in methods:
        a = acc[m]  # (splits, sizes, repeats)
        results[m] = {
            "N": [int(n) for n in config.sizes],
            "mean": [float(v) for v in a.mean(axis=(0, 2))],
            "std": [float(v) for v in a.transpose(1, 0, 2).reshape(len(config.sizes), -1).std(axis=1)],
            "std_draws": [float(v) for v in a.std(axis=2).mean(axis=0)],
            "std_splits": [float(v) for v in a.mean(axis=2).std(axis=0)],
        }
        if m in probs_by_n[0]:
            outcomes = [np.concatenate(probs_by_n[i][m]) for i in range(len(config.sizes))]
            results[m]["log_loss"] = [float(-np.mean(np.log(np.clip(p, 1e-12, 1)))) for p in outcomes]
            results[m]["ece"] = [expected_calibration_error(p) for p in outcomes]
            calibration[m] = reliability(outcomes[-1])
    parts, skipped_users = all_parts[0]
    counts = {
        "pairs": int(len(data.preferred)),
        "eval_pairs": int(sum(len(p.eval) for p in parts)),
        "tune_pairs": int(sum(len(p.tune) for p in parts)),
        "pool_pairs": int(sum(len(p.pool) for p in parts)),
        "users": len(parts) if config.per_user else None,
        "users_skipped": len(skipped_users) if config.per_user else None,
    }
    oracle = None if oracles[0] is None else float(np.mean(oracles))
    return BenchResult(
        name,
        results,
        oracle,
        {m: [c[m] for c in chosen_per_split] for m in methods},
        counts,
        {**asdict(config), "sizes": list(config.sizes), "methods": methods},
        skipped,
        calibration=calibration,
    )


# ---------------------------------------------------------------------------------------------
# Calibration


def _folded(p_preferred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pair stated in the model's favoured order: (confidence max(p, 1 - p), whether that side won)."""
    p = np.asarray(p_preferred, dtype=np.float64)
    return np.maximum(p, 1 - p), (p > 0.5) + 0.5 * (p == 0.5)


def expected_calibration_error(p_preferred, bins: int = 10) -> float:
    """ECE of predicted probabilities that the preferred image wins: sum over equal-width bins of the
    confidence max(p, 1 - p) of the bin's share of pairs times |accuracy - mean confidence| in it."""
    conf, won = _folded(p_preferred)
    edges = np.minimum(((conf - 0.5) * 2 * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = edges == b
        if inside.any():
            total += inside.mean() * abs(won[inside].mean() - conf[inside].mean())
    return float(total)


def reliability(p_preferred, bins: int = 10) -> dict:
    """Reliability-diagram data: per confidence bin (0.5 .. 1), the mean confidence, the accuracy and the count."""
    conf, won = _folded(p_preferred)
    edges = np.minimum(((conf - 0.5) * 2 * bins).astype(int), bins - 1)
    rows = {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        inside = edges == b
        if inside.any():
            rows["confidence"].append(float(conf[inside].mean()))
            rows["accuracy"].append(float(won[inside].mean()))
            rows["count"].append(int(inside.sum()))
    return rows


def _oracle(data: EncodedDataset, parts: list[_Part], config: BenchConfig) -> float | None:
    """Bayes-optimal expected accuracy on the evaluation pairs: knowing the user in per-user mode
    (mean over users), not knowing it otherwise. None for data with no known truth."""
    truth = data.bayes if config.per_user else data.bayes_pooled
    if truth is None:
        return None
    return float(np.mean([truth[p.eval].mean() for p in parts]))


# ---------------------------------------------------------------------------------------------
# Report


def write(result: BenchResult, folder: str | Path, stem: str) -> dict[str, Path]:
    """Write `stem`.json, `stem`.md (the table and the command) and `stem`.png (the plot) into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {ext: folder / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2) + "\n")
    md = [f"# Preference classification: {result.dataset}", ""]
    if result.command:
        md += ["Made by:", "", f"    {result.command}", ""]
    splits = result.config.get("splits", 1)
    md += [
        f"Accuracy (%) on the evaluation pairs over {splits} splits x {result.config.get('repeats')} random "
        "training sets: mean ± std over the training sets (within a split, averaged) / std of the splits' means.",
        "",
        result.table(),
        "",
    ]
    calibrated = [m for m, row in result.methods.items() if "ece" in row]
    if calibrated:
        sizes = next(iter(result.methods.values()))["N"]
        md += [
            "Calibration of each method's own probability sigmoid(beta * margin) on the evaluation pairs: "
            "log-loss (nats) / expected calibration error (10 bins).",
            "",
            "| method | " + " | ".join(f"N={n}" for n in sizes) + " |",
            "|---|" + "---|" * len(sizes),
        ]
        md += [
            f"| {m} | "
            + " | ".join(
                f"{ll:.3f} / {e:.3f}" for ll, e in zip(result.methods[m]["log_loss"], result.methods[m]["ece"])
            )
            + " |"
            for m in calibrated
        ]
        md += ["", f"Reliability at N={sizes[-1]}: `{stem}_reliability.png`.", ""]
    md += [
        f"Hyper-parameters (chosen on the tuning pairs, one per split): `{json.dumps(result.hyperparameters)}`",
        "",
        f"Counts (split 0): `{json.dumps(result.counts)}`",
    ]
    if result.skipped:
        md += ["", f"Not run: `{json.dumps(result.skipped)}`"]
    paths["md"].write_text("\n".join(md) + "\n")
    plot(result, paths["png"])
    if result.calibration:
        paths["reliability"] = folder / f"{stem}_reliability.png"
        plot_reliability(result, paths["reliability"])
    return paths


def plot_reliability(result: BenchResult, path: str | Path) -> None:
    """Reliability diagram at the largest N: accuracy against confidence per bin, the diagonal dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.plot([0.5, 1], [0.5, 1], color="black", ls="--", lw=1, label="perfect")
    for name, rows in result.calibration.items():
        ece = result.methods[name]["ece"][-1]
        ax.plot(rows["confidence"], rows["accuracy"], marker="o", ms=3, label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("predicted probability of the favoured image")
    ax.set_ylabel("share of pairs it won")
    ax.set_title(f"{result.dataset}, N={next(iter(result.methods.values()))['N'][-1]}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot(result: BenchResult, path: str | Path) -> None:
    """Accuracy against N, a ±1 std band per method, the oracle dashed (like the paper's Figure 1, right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, row in result.methods.items():
        n, mean, std = (np.asarray(row[k], dtype=float) for k in ("N", "mean", "std"))
        x = np.arange(len(n))
        ax.plot(x, 100 * mean, marker="o", ms=3, label=name)
        ax.fill_between(x, 100 * (mean - std), 100 * (mean + std), alpha=0.15)
    if result.oracle is not None:
        ax.axhline(100 * result.oracle, color="black", ls="--", lw=1, label="oracle (Bayes-optimal)")
    sizes = next(iter(result.methods.values()))["N"]
    ax.set_xticks(np.arange(len(sizes)), [str(n) for n in sizes])
    ax.set_xlabel("training pairs N")
    ax.set_ylabel("accuracy on evaluation pairs (%)")
    mode = ", per user" if result.config.get("per_user") else ""
    query = f", {result.config['query']} query" if result.config.get("query") else ""
    ax.set_title(f"{result.dataset}{mode}{query}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
