"""`clipbt serve` under load: closed-loop clients on loopback against one in-process-at-a-time baseline.

    python benchmarks/bench_serve.py              # preset M: flat index of 100,000 x 512 (the issue's target)
    python benchmarks/bench_serve.py --size S     # 10,000 x 512, a quick check

Setup (as benchmarks/bench_query.py): a SQLite store with n seeded random unit embeddings (dim 512),
a flat FAISS index, the random-weight ViT-B-32 text tower, `--users` users with `--pairs` pairs each,
each with an account and an API token. The service runs in its own process (uvicorn, one worker,
the micro-batcher on); the clients are asyncio tasks in this process, one keep-alive HTTP/1.1
connection each, each sending its next request as soon as the last one is answered (closed loop).

Each request is a personalised search (k = 10) for one of the users, with a random query text of
64; every `--write-every`-th request of a client is instead a POST /api/v1/preferences for its user
(which also empties that user's cached adapted queries). Concurrency 1, 8 and 64, each bounded by a
request count and a time limit. The baseline is the same kind of search (random user, random text)
run in this process through `Engine.search`, one at a time; its rounds are interleaved with the
served levels. Reports searches/s, p50 and p99 latency, errors, the batches the service formed
(GET /api/v1/stats before and after each level: how many, their mean size), and whether every
acknowledged preference write is in the store. Writes benchmarks/results/serve.json and serve.png.
"""

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_query import DIM, SIZES, TEXTS, build  # benchmarks/bench_query.py
from machine import describe  # benchmarks/machine.py

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
LEVELS = {1: (200, 60.0), 8: (800, 60.0), 64: (2500, 90.0)}  # concurrency: (most requests, most seconds)
SERVER = """
import sys, uvicorn
from engine.serve import ServeConfig, create_app
uvicorn.run(create_app(ServeConfig(home=sys.argv[1], collection="bench")), host="127.0.0.1",
            port=int(sys.argv[2]), log_level="warning", backlog=512)
"""


class Connection:
    """One keep-alive HTTP/1.1 connection: just enough client for a benchmark (no library overhead)."""

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def request(self, token: str, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def run_level(
    port: int,
    tokens: dict[str, str],
    image_ids: np.ndarray,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    write_every: int,
    seed: int,
) -> dict:
    users = sorted(tokens)
    latencies: list[float] = []
    counts = {"searches": 0, "writes": 0, "errors": 0}
    budget = iter(range(max_requests))
    deadline = time.perf_counter() + max_seconds

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        conn = Connection(port)
        for j in range(max_requests):
            if next(budget, None) is None or time.perf_counter() > deadline:
                break
            user = users[(i + j * concurrency) % len(users)]  # every request for its own user
            text = rng.choice(TEXTS)
            try:
                if write_every and j % write_every == write_every - 1:
                    a, b = rng.sample(range(len(image_ids)), 2)
                    body = json.dumps({"query": text, "preferred": int(image_ids[a]), "rejected": int(image_ids[b])})
                    status, _ = await conn.request(tokens[user], "POST", "/api/v1/preferences", body.encode())
                    ok = status == 201
                    counts["writes"] += ok
                else:
                    start = time.perf_counter()
                    status, payload = await conn.request(
                        tokens[user], "GET", f"/api/v1/search?q={text.replace(' ', '+')}&k=10"
                    )
                    ok = status == 200 and len(json.loads(payload)["results"]) == 10
                    if ok:
                        latencies.append(time.perf_counter() - start)
                        counts["searches"] += 1
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                ok = False
                conn.close()
            counts["errors"] += not ok
        conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "wall_s": round(wall, 2),
        **counts,
        "qps": round(counts["searches"] / wall, 1),
        **_percentiles(latencies),
    }


def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50_ms": None, "p99_ms": None}
    return {
        "p50_ms": round(1000 * float(np.percentile(seconds, 50)), 2),
        "p99_ms": round(1000 * float(np.percentile(seconds, 99)), 2),
    }


def baseline_round(engine, users: list[str], count: int, rng: random.Random) -> dict:
    """`count` personalised searches in this process, one at a time."""
    times = []
    start = time.perf_counter()
    for _ in range(count):
        t = time.perf_counter()
        engine.search(rng.choice(TEXTS), rng.choice(users), 10)
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    return {"searches": count, "wall_s": round(wall, 2), "qps": round(count / wall, 1), **_percentiles(times)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="M", help="collection size preset")
    parser.add_argument("--users", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument(
        "--write-every", type=int, default=10, help="every n-th request of a client is a preference write"
    )
    parser.add_argument("--baseline", type=int, default=100, help="searches per baseline round")
    args = parser.parse_args()
    n = SIZES[args.size]
    from engine.search import Engine

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store, coll = build(Path(tmp), n, args.users, args.pairs, seed=0)
        users = store.users()
        tokens = {}
        for user in users:
            store.add_account(user)
            tokens[user] = store.create_token(user)[1]
        image_ids = store.image_ids(coll.id)
        pairs_before = store._fetch_direct("SELECT count(*) FROM pairs", [])[0][0]
        engine = Engine(store, coll)  # the baseline: same store, same index file, same encoder
        engine.encode(TEXTS)  # warm-up: every query text encoded once (the server's warm-up does the same)
        for user in users:
            engine.search(TEXTS[0], user, 10)  # ... the index, every user's pairs
        print(f"setup: {n} x {DIM} flat, {len(users)} users x {args.pairs} pairs, {time.perf_counter() - t0:.0f}s")

        port = free_port()
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        server = subprocess.Popen([sys.executable, "-c", SERVER, tmp, str(port)], env=env)
        try:
            _wait_healthy(port, server)
            asyncio.run(
                run_level(port, tokens, image_ids, 8, max(len(users), 4 * len(TEXTS)), 300.0, 0, seed=99)
            )  # warm-up
            rng = random.Random(1)
            rounds, levels = [], []
            rounds.append(baseline_round(engine, users, args.baseline, rng))
            some_token = next(iter(tokens.values()))
            for concurrency, (count, seconds) in LEVELS.items():
                before = _stats(port, some_token)
                levels.append(
                    asyncio.run(
                        run_level(
                            port, tokens, image_ids, concurrency, count, seconds, args.write_every, seed=concurrency
                        )
                    )
                )
                after = _stats(port, some_token)
                batches = after["batches"] - before["batches"]
                levels[-1]["batches"] = batches
                levels[-1]["mean_batch"] = round((after["searches"] - before["searches"]) / max(batches, 1), 1)
                levels[-1]["largest_batch_so_far"] = after["largest_batch"]
                rounds.append(baseline_round(engine, users, args.baseline, rng))
                print(f"served  c={concurrency:<3} {levels[-1]}")
                print(f"in-process one at a time {rounds[-1]}")
        finally:
            server.terminate()
            server.wait(30)
        pairs_after = store._fetch_direct("SELECT count(*) FROM pairs", [])[0][0]
        store.close()

    writes = sum(level["writes"] for level in levels)
    base_qps = statistics.median(r["qps"] for r in rounds)
    top = levels[-1]
    result = {
        "size": args.size,
        "n": n,
        "dim": DIM,
        "index": "flat",
        "k": 10,
        "users": len(users),
        "pairs_per_user": args.pairs,
        "write_every": args.write_every,
        "machine": describe(),
        "baseline_rounds": rounds,
        "baseline_qps_median": base_qps,
        "levels": levels,
        "writes_acknowledged": writes,
        "writes_in_store": pairs_after - pairs_before,
        "speedup_at_64": round(top["qps"] / base_qps, 2),
        "goals": {"speedup_at_64": ">= 3", "p99_ms_at_64": "<= 1000", "errors": 0, "every_write_lands": True},
        "met": {
            "speedup_at_64": top["qps"] >= 3 * base_qps,
            "p99_ms_at_64": top["p99_ms"] is not None and top["p99_ms"] <= 1000,
            "errors": sum(level["errors"] for level in levels) == 0,
            "every_write_lands": writes == pairs_after - pairs_before,
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("baseline_qps_median", "speedup_at_64", "writes_acknowledged", "writes_in_store", "met")
            },
            indent=2,
        )
    )
    _plot(result, RESULTS / "serve.png")


def _stats(port: int, token: str) -> dict:
    """The service's batching counters (GET /api/v1/stats)."""
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/stats", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait_healthy(port: int, server: subprocess.Popen, timeout: float = 300.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not answer /healthz in time")


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    labels = [str(level["concurrency"]) for level in levels]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(labels, [level["qps"] for level in levels], color="#2458c6", label="served (HTTP, micro-batched)")
    axes[0].axhline(result["baseline_qps_median"], color="#b3261e", linestyle="--", label="in-process, one at a time")
    axes[0].axhline(3 * result["baseline_qps_median"], color="#777", linestyle=":", label="goal at 64: 3x")
    axes[0].set_xlabel("concurrent clients")
    axes[0].set_ylabel("personalised searches / s")
    axes[0].legend(fontsize=8)
    x = np.arange(len(levels))
    axes[1].bar(x - 0.2, [level["p50_ms"] for level in levels], 0.4, label="p50")
    axes[1].bar(x + 0.2, [level["p99_ms"] for level in levels], 0.4, label="p99")
    axes[1].axhline(1000, color="#777", linestyle=":", label="goal p99 at 64: 1 s")
    axes[1].set_xticks(x, labels)
    axes[1].set_xlabel("concurrent clients")
    axes[1].set_ylabel("latency (ms)")
    axes[1].legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(
        f"clipbt serve, flat {result['n']:,} x {result['dim']}, {result['users']} users x "
        f"{result['pairs_per_user']} pairs; {m['cpu']}, {m['cores']} cores; "
        f"{result['speedup_at_64']}x at 64",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
