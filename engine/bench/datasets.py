"""Preference-pair datasets for `clipbt bench preference`: six layouts into one PreferenceDataset, then encoded."""

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from engine.bt import GLOBAL_QUALITY_QUERY
from indexer import world
from storage.errors import ClipbtError
from storage.numeric import logistic

FORMATS = ("pickapic", "hpdv2", "imagereward", "jsonl", "npz", "world")


class PreferenceDataError(ClipbtError):
    """A preference dataset file is missing, of an unknown layout, or holds a bad value."""


@dataclass
class PreferenceDataset:
    """M preference pairs over K images, in any layout; `preferred[i]` beat `rejected[i]`."""

    name: str  # where it came from, e.g. "pickapic:/data/test.parquet"
    images: list | np.ndarray  # K image sources (Path or encoded bytes), or (K, d) embeddings already computed
    preferred: np.ndarray  # (M,) int64 index into images of each pair's preferred image
    rejected: np.ndarray  # (M,) int64 index into images of each pair's rejected image
    prompts: list[str] | None = None  # (M,) each pair's prompt; None when the layout has none
    query_vectors: np.ndarray | None = None  # (M, d) or (1, d) query embeddings given by the file (npz)
    users: np.ndarray | None = None  # (M,) str user id of each pair; None when unknown
    group: np.ndarray | None = None  # (M,) int64: pairs of one group (one ranked prompt) are never split apart
    image_rank: np.ndarray | None = None  # (K,) human rank of each image in its group, lower is better (ranked layouts)
    ties_skipped: int = 0  # tied comparisons the layout held and the loader dropped
    bayes: np.ndarray | None = None  # (M,) expected accuracy of the Bayes-optimal guess knowing the user (simulated)
    bayes_pooled: np.ndarray | None = None  # (M,) the same for the best guess that does not know the user

    def __post_init__(self):
        self.preferred = np.asarray(self.preferred, dtype=np.int64)
        self.rejected = np.asarray(self.rejected, dtype=np.int64)
        m = len(self.preferred)
        if self.group is None:
            self.group = np.arange(m, dtype=np.int64)
        for field in ("rejected", "group", "users", "bayes", "bayes_pooled"):
            value = getattr(self, field)
            if value is not None and len(value) != m:
                raise PreferenceDataError(f"{self.name}: {field} has {len(value)} entries but there are {m} pairs")
        if self.prompts is not None and len(self.prompts) != m:
            raise PreferenceDataError(f"{self.name}: prompts has {len(self.prompts)} entries but there are {m} pairs")

    def __len__(self) -> int:
        return len(self.preferred)


def detect_format(path: str | os.PathLike) -> str:
    """The layout of a dataset path, from its suffix and, for .json, its first record's keys."""
    path = Path(path)
    if str(path) == "world":
        return "world"
    if not path.exists():
        raise PreferenceDataError(f"no such dataset file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "pickapic"
    if suffix == ".npz":
        return "npz"
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        records = _read_json_list(path)
        keys = set(records[0]) if records else set()
        if {"image_path", "rank"} <= keys:
            return "hpdv2"
        if {"generations", "ranking"} <= keys:
            return "imagereward"
        raise PreferenceDataError(
            f"{path}: a .json record needs keys image_path+rank (HPD v2) or generations+ranking (ImageReward), "
            f"got {sorted(keys)}; name the layout with --format"
        )
    raise PreferenceDataError(
        f"{path}: cannot tell the layout from suffix {suffix!r}; name it with --format (one of {', '.join(FORMATS)})"
    )


def load(path: str | os.PathLike, fmt: str | None = None) -> PreferenceDataset:
    """Load a dataset file in layout `fmt` (detected when None). `world` is built by `load_world`."""
    fmt = fmt or detect_format(path)
    loaders = {
        "pickapic": load_pickapic,
        "hpdv2": load_hpdv2,
        "imagereward": load_imagereward,
        "jsonl": load_jsonl,
        "npz": load_npz,
    }
    if fmt == "world":
        raise PreferenceDataError("the world dataset is built from a seed, not a file: use load_world")
    if fmt not in loaders:
        raise PreferenceDataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not Path(path).exists():
        raise PreferenceDataError(f"no such dataset file: {path}")
    return loaders[fmt](Path(path))


# ---------------------------------------------------------------------------------------------
# Loaders, one per layout


PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "user_id")


def load_pickapic(path: Path) -> PreferenceDataset:
    """Pick-a-Pic v2 parquet: caption, jpg_0/jpg_1 (image bytes), label_0/label_1 (1/0, 0/1, or 0.5/0.5 for a tie),
    user_id. Ties are skipped and counted."""
    schema = pq.read_schema(path)
    missing = [c for c in PICKAPIC_COLUMNS if c not in schema.names]
    if missing:
        raise PreferenceDataError(f"{path}: Pick-a-Pic parquet lacks column(s) {missing}; it has {schema.names}")
    table = pq.read_table(path, columns=list(PICKAPIC_COLUMNS)).to_pydict()
    images, preferred, rejected, prompts, users, ties = [], [], [], [], [], 0
    for i, (cap, a, b, la, lb, user) in enumerate(zip(*(table[c] for c in PICKAPIC_COLUMNS))):
        if la == lb == 0.5:
            ties += 1
            continue
        if {la, lb} != {0.0, 1.0}:
            raise PreferenceDataError(f"{path}: row {i} has label_0={la}, label_1={lb}; expected 1/0, 0/1 or 0.5/0.5")
        images += [a, b]
        win, lose = (len(images) - 2, len(images) - 1) if la == 1.0 else (len(images) - 1, len(images) - 2)
        preferred.append(win)
        rejected.append(lose)
        prompts.append(cap)
        users.append(str(user))
    return PreferenceDataset(
        f"pickapic:{path}",
        images,
        preferred,
        rejected,
        prompts=prompts,
        users=np.array(users, dtype=str),
        ties_skipped=ties,
    )


def load_hpdv2(path: Path) -> PreferenceDataset:
    """HPD v2 test.json: a list of {"prompt", "image_path": [...], "rank": [...]}, rank 1 (or 0) the best."""
    return _load_ranked(path, "image_path", "rank", "hpdv2")


def load_imagereward(path: Path) -> PreferenceDataset:
    """ImageReward test.json: a list of {"id", "prompt", "generations": [...], "ranking": [...]}, ranking 1 the best."""
    return _load_ranked(path, "generations", "ranking", "imagereward")


def _load_ranked(path: Path, images_key: str, rank_key: str, fmt: str) -> PreferenceDataset:
    """Every untied pair of every ranked prompt; one group per prompt, so a prompt's pairs are split together."""
    images, image_rank, preferred, rejected, prompts, group, ties = [], [], [], [], [], [], 0
    for g, record in enumerate(_read_json_list(path)):
        for key in ("prompt", images_key, rank_key):
            if key not in record:
                raise PreferenceDataError(
                    f"{path}: record {g} has no {key!r}; {fmt} records need prompt, {images_key}, {rank_key}"
                )
        files, ranks = record[images_key], record[rank_key]
        if len(files) != len(ranks):
            raise PreferenceDataError(f"{path}: record {g} has {len(files)} images but {len(ranks)} ranks")
        first = len(images)
        images += [_resolve_image(path, f) for f in files]
        image_rank += [float(r) for r in ranks]
        for i in range(len(files)):
            for j in range(i + 1, len(files)):
                if ranks[i] == ranks[j]:
                    ties += 1
                    continue
                win, lose = (i, j) if ranks[i] < ranks[j] else (j, i)
                preferred.append(first + win)
                rejected.append(first + lose)
                prompts.append(record["prompt"])
                group.append(g)
    return PreferenceDataset(
        f"{fmt}:{path}",
        images,
        preferred,
        rejected,
        prompts=prompts,
        group=np.array(group, dtype=np.int64),
        image_rank=np.array(image_rank),
        ties_skipped=ties,
    )


def load_jsonl(path: Path) -> PreferenceDataset:
    """Generic JSONL: one {"prompt", "image_a", "image_b", "preferred": "a" | "b", "user"?} per line; image paths
    relative to the file's folder."""
    images, index, preferred, rejected, prompts, users = [], {}, [], [], [], []
    has_user = None
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PreferenceDataError(f"{path}:{n}: not JSON ({exc})") from None
        missing = [k for k in ("prompt", "image_a", "image_b", "preferred") if k not in row]
        if missing:
            raise PreferenceDataError(f"{path}:{n}: missing key(s) {missing}")
        if row["preferred"] not in ("a", "b"):
            raise PreferenceDataError(f"{path}:{n}: preferred is {row['preferred']!r}; expected 'a' or 'b'")
        if has_user is None:
            has_user = "user" in row
        elif has_user != ("user" in row):
            raise PreferenceDataError(f"{path}:{n}: 'user' must be given on every line or on none")
        ab = []
        for key in ("image_a", "image_b"):
            source = _resolve_image(path, row[key])
            ab.append(index.setdefault(source, len(index)))
            if ab[-1] == len(images):
                images.append(source)
        win, lose = ab if row["preferred"] == "a" else ab[::-1]
        preferred.append(win)
        rejected.append(lose)
        prompts.append(row["prompt"])
        users.append(str(row.get("user")))
    if not preferred:
        raise PreferenceDataError(f"{path}: no pairs")
    return PreferenceDataset(
        f"jsonl:{path}",
        images,
        preferred,
        rejected,
        prompts=prompts,
        users=np.array(users, dtype=str) if has_user else None,
    )


def load_npz(path: Path) -> PreferenceDataset:
    """Embedding-level .npz: query (M, d) or (1, d), preferred (M, d), rejected (M, d), optional user (M,).
    Vectors are l2-normalised on load (eq. 1 assumes unit vectors)."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("query", "preferred", "rejected") if k not in z.files]
        if missing:
            raise PreferenceDataError(f"{path}: .npz lacks array(s) {missing}; it has {z.files}")
        query, pref, rej = (np.asarray(z[k], dtype=np.float32) for k in ("query", "preferred", "rejected"))
        users = np.asarray(z["user"]).astype(str) if "user" in z.files else None
    if pref.ndim != 2 or pref.shape != rej.shape:
        raise PreferenceDataError(f"{path}: preferred {pref.shape} and rejected {rej.shape} must both be (M, d)")
    m, d = pref.shape
    if query.ndim != 2 or query.shape[1] != d or query.shape[0] not in (1, m):
        raise PreferenceDataError(f"{path}: query has shape {query.shape}; expected ({m}, {d}) or (1, {d})")
    vectors = _unit_rows(np.concatenate([pref, rej]), f"{path} preferred/rejected")
    return PreferenceDataset(
        f"npz:{path}",
        vectors,
        np.arange(m),
        m + np.arange(m),
        query_vectors=_unit_rows(query, f"{path} query"),
        users=users,
    )


@dataclass(frozen=True)
class WorldBenchConfig:
    """How the `world` dataset is drawn from the default world (indexer.world)."""

    images: int = 1000  # world images generated and encoded
    users: int = 10  # simulated users (indexer.world.sample_users)
    pairs_per_user: int = 600  # random image pairs each user answers
    seed: int = 0  # seeds the images, the users and their answers


def load_world(folder: str | os.PathLike, config: WorldBenchConfig = WorldBenchConfig()) -> PreferenceDataset:
    """Simulated users of the default world answering random image pairs by sampling their BT model.
    World pairs have no prompt (use the global query).

    The images are written once into `folder` (indexer.world.write_collection). Each pair carries the
    Bayes-optimal expected accuracy for it, knowing the user (indexer.world.bayes_optimal_accuracy) and
    not knowing the user (the BT probability averaged over all users, whose pairs are equally many)."""
    folder = Path(folder)
    if (folder / world.LABELS_FILE).is_file() and len(world.read_collection(folder)) == config.images:
        collection = world.read_collection(folder)
    else:
        collection = world.write_collection(folder, config.images, seed=config.seed)
    attrs = [a for _, a in collection]
    users = world.sample_users(config.users, seed=config.seed)
    rng = np.random.default_rng([config.seed, 1])
    utilities = np.stack([u.utilities(attrs) for u in users])  # (U, K)
    preferred, rejected, owner, bayes, pooled = [], [], [], [], []
    for user in users:
        for _ in range(config.pairs_per_user):
            a, b = (int(i) for i in rng.choice(len(attrs), size=2, replace=False))
            win, lose = (a, b) if user.prefers(attrs[a], attrs[b], rng) else (b, a)
            preferred.append(win)
            rejected.append(lose)
            owner.append(user.name)
            bayes.append(world.bayes_optimal_accuracy(user, [(attrs[a], attrs[b])]))
            p = float(np.mean(logistic(utilities[:, a] - utilities[:, b])))
            pooled.append(max(p, 1.0 - p))
    return PreferenceDataset(
        f"world:seed={config.seed},images={config.images},users={config.users}",
        [p for p, _ in collection],
        preferred,
        rejected,
        users=np.array(owner, dtype=str),
        bayes=np.array(bayes),
        bayes_pooled=np.array(pooled),
    )


# ---------------------------------------------------------------------------------------------
# Encoding, with an on-disk cache of image embeddings


@dataclass
class EncodedDataset:
    """A PreferenceDataset with every vector computed: what the protocol runs on."""

    images: np.ndarray  # (K, d) float32 unit image embeddings
    queries: np.ndarray  # (M, d) float32 unit query embedding of each pair (the global query repeated, or its prompt)
    preferred: np.ndarray  # (M,) int64 into images
    rejected: np.ndarray  # (M,) int64 into images
    users: np.ndarray | None  # (M,) str
    group: np.ndarray  # (M,) int64
    image_rank: np.ndarray | None  # (K,) lower is better, ranked layouts only
    bayes: np.ndarray | None  # (M,) see PreferenceDataset
    bayes_pooled: np.ndarray | None  # (M,)


def encode(
    dataset: PreferenceDataset, encoder=None, query: str = "global", cache: "EmbeddingCache | None" = None
) -> EncodedDataset:
    """Compute the image and query vectors of `dataset` with `encoder` (not needed for .npz data).

    query="global": every pair is scored against one text (default: the paper's "An amazing and
    high-quality image"); query="pair": against its own prompt. A .npz file's own query vectors are
    used as they are. Image embeddings go through `cache`."""
    if query not in ("global", "pair"):
        raise PreferenceDataError(f"query must be 'global' or 'pair', got {query!r}")
    m = len(dataset)
    if isinstance(dataset.images, np.ndarray):
        images = dataset.images.astype(np.float32)
    else:
        if encoder is None:
            raise PreferenceDataError(f"{dataset.name} holds images, not embeddings: it needs an encoder")
        images = (cache or EmbeddingCache(None)).encode_images(encoder, dataset.images)
    d = images.shape[1]
    if dataset.query_vectors is not None:  # the file's own query vectors, whatever `query` says
        queries = np.broadcast_to(dataset.query_vectors, (m, d))
    elif encoder is None:
        raise PreferenceDataError(f"{dataset.name}: encoding the queries needs an encoder")
    elif query == "pair":
        if dataset.prompts is None:
            raise PreferenceDataError(f"{dataset.name} has no prompts: use --query global")
        unique = sorted(set(dataset.prompts))
        table = dict(zip(unique, _unit_rows(_numpy(encoder.encode_text(unique)), "text embeddings")))
        queries = np.stack([table[p] for p in dataset.prompts])
    else:
        text = _unit_rows(_numpy(encoder.encode_text([GLOBAL_QUALITY_QUERY])), "text embedding")
        queries = np.broadcast_to(text, (m, d))
    return EncodedDataset(
        images,
        np.ascontiguousarray(queries, dtype=np.float32),
        dataset.preferred,
        dataset.rejected,
        dataset.users,
        dataset.group,
        dataset.image_rank,
        dataset.bayes,
        dataset.bayes_pooled,
    )


class EmbeddingCache:
    """Image embeddings on disk, one .npz per model: keys are sha256 of the image bytes, so any
    path or copy of the same image is encoded once. `folder=None` keeps nothing."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = None if folder is None else Path(folder)

    def encode_images(self, encoder, sources: list) -> np.ndarray:
        """(K, d) unit embeddings of `sources` (Paths or bytes), encoding only those not cached."""
        data = [_read_bytes(s) for s in sources]
        keys = [hashlib.sha256(b).hexdigest() for b in data]
        file = None if self.folder is None else self.folder / f"{_model_key(encoder)}.npz"
        known: dict[str, np.ndarray] = {}
        if file is not None and file.is_file():
            with np.load(file) as z:
                known = dict(zip(z["keys"].tolist(), z["vectors"]))
        todo = {k: b for k, b in zip(keys, data) if k not in known}
        if todo:
            order = list(todo)
            pil = [Image.open(io.BytesIO(todo[k])).convert("RGB") for k in order]
            vectors = _unit_rows(_numpy(_encode_pil(encoder, pil)), "image embeddings")
            known.update(zip(order, vectors))
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                tmp = file.with_suffix(".tmp.npz")
                np.savez(tmp, keys=np.array(list(known)), vectors=np.stack(list(known.values())))
                os.replace(tmp, file)
        return np.stack([known[k] for k in keys]).astype(np.float32)


def _encode_pil(encoder, images: list, batch: int = 256) -> np.ndarray:
    """Embeddings of PIL images through the encoder's own preprocessing (indexer.encoder.Encoder)."""
    out = [
        encoder.encode_images(torch.stack([encoder.preprocess(im) for im in images[i : i + batch]]))
        for i in range(0, len(images), batch)
    ]
    return np.concatenate([_numpy(o) for o in out])


def _model_key(encoder) -> str:
    """A file-name-safe identity of the model: its name and weights (a tag, or the sha256 of a weights file)."""
    name = f"{encoder.model_name}-{encoder.pretrained or 'default'}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ---------------------------------------------------------------------------------------------
# Helpers


def _read_json_list(path: Path) -> list:
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PreferenceDataError(f"{path}: not JSON ({exc})") from None
    if not isinstance(records, list):
        raise PreferenceDataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def _resolve_image(dataset_file: Path, name: str) -> Path:
    """An image path relative to the dataset file's folder, or to the folder named after the file
    (HPD v2 ships test.json beside test/)."""
    for base in (dataset_file.parent, dataset_file.parent / dataset_file.stem):
        candidate = base / name
        if candidate.is_file():
            return candidate
    raise PreferenceDataError(
        f"{dataset_file}: image {name!r} not found in {dataset_file.parent} "
        f"or {dataset_file.parent / dataset_file.stem}"
    )


def _read_bytes(source) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    path = Path(source)
    if not path.is_file():
        raise PreferenceDataError(f"image {path} not found")
    return path.read_bytes()


def _numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float32)


def _unit_rows(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise PreferenceDataError(f"{name} hold a non-finite value at {np.argwhere(~np.isfinite(a))[0].tolist()}")
    norms = np.linalg.norm(a, axis=-1, keepdims=True)
    if (norms == 0).any():
        raise PreferenceDataError(f"{name}: row {int(np.argwhere(norms[:, 0] == 0)[0, 0])} is a zero vector")
    return a / norms
