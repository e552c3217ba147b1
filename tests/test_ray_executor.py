"""The Ray executor against the local one, with the shipped model on world images and bad files: same collection, reruns embed nothing, a killed run resumes."""

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from indexer_fixtures import make_bad_files

from engine.cli import main
from indexer.encoder import Encoder
from indexer.errors import RayClusterError
from indexer.pipeline import index_paths
from indexer.ray_executor import RayOptions, plan_resources
from indexer.vectors.collection import open_index
from indexer.world import write_collection
from storage import Store

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray[data] is not installed: pip install 'clipbt[ray]'"
)
BATCH = 8


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for the module, with 2 CPUs like CI; in-process runs reuse it, child processes connect to it."""
    from indexer.ray_executor import ray_session

    with ray_session(num_cpus=2) as ray:
        yield ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """30 world images and one bad file of each kind (in bad/)."""
    folder = tmp_path_factory.mktemp("photos")
    write_collection(folder, 30, seed=3)
    make_bad_files(folder / "bad")
    return folder


@pytest.fixture(scope="module")
def local(photos, tmp_path_factory):
    """(report, state) of the local executor on `photos`: the reference."""
    with Store.open(home=tmp_path_factory.mktemp("local")) as store:
        report = index_paths(store, [photos], encoder=Encoder.load(), workers=0, batch_size=BATCH, progress=False)
        return report, state(store)


def state(store: Store) -> dict[str, tuple[tuple, np.ndarray]]:
    """{uri: ((sha256, width, height), embedding)} of the live images."""
    images = store.images("default")
    ids, vectors = store.embeddings("default")
    assert ids.tolist() == [im.id for im in images]
    return {im.uri: ((im.sha256, im.width, im.height), v) for im, v in zip(images, vectors, strict=True)}


def assert_same_collection(got: dict, want: dict) -> None:
    assert {u: meta for u, (meta, _) in got.items()} == {u: meta for u, (meta, _) in want.items()}
    cosines = [float(got[u][1] @ v / (np.linalg.norm(got[u][1]) * np.linalg.norm(v))) for u, (_, v) in want.items()]
    assert min(cosines) > 1 - 1e-3


def staged_files(home: Path) -> list[Path]:
    return [p for p in (home / "staging").rglob("*") if p.is_file() and p.name != ".lock"]


@needs_ray
def test_ray_cli_gives_the_local_collection_and_a_rerun_embeds_nothing(ray_address, photos, local, tmp_path):
    local_report, want = local
    home = tmp_path / "home"
    args = [
        "--home",
        str(home),
        "index",
        str(photos),
        "--model",
        "clipbt-tiny",
        "--executor",
        "ray",
        "--batch-size",
        str(BATCH),
        "--no-progress",
        "--json",
    ]
    result = CliRunner().invoke(main, [*args, "--workers", "2"])
    assert result.exit_code == 3, result.output  # done, with the bad files skipped
    first = json.loads(result.stdout)
    assert (first["indexed"], first["unchanged"], first["files"], first["workers"]) == (30, 0, 35, 2)
    assert first["skipped"] == [{"path": s.path, "reason": s.reason} for s in local_report.skipped]
    assert len(first["skipped"]) == 5
    with Store.open(home=home) as store:
        assert_same_collection(state(store), want)
        ids, vectors = store.embeddings("default")
        _, found = open_index(store, "default").search(vectors, 1)
        assert (found[:, 0] == ids).all()
    assert staged_files(home) == []  # every shard committed and cleared

    again = json.loads(CliRunner().invoke(main, args).stdout)
    assert (again["indexed"], again["unchanged"], again["shards"], again["salvaged"]) == (0, 30, 0, 0)
    assert again["skipped"] == first["skipped"]
    with Store.open(home=home) as store:
        assert len(store.images("default", include_deleted=True)) == 30


_CHILD = """
import time
from indexer.pipeline import IndexOptions
from indexer.ray_executor import RayOptions, index_paths_ray
from storage import Store

add_images = Store.add_images
def add_images_slowly(self, *args, **kwargs):
    if add_images_slowly.calls == 1:  # the second shard is on disk: stop before committing it
        print("written", flush=True)
        time.sleep(120)
    add_images_slowly.calls += 1
    ids = add_images(self, *args, **kwargs)
    print("committed", len(ids), flush=True)
    return ids
add_images_slowly.calls = 0
Store.add_images = add_images_slowly
index_paths_ray(Store.open(home={home!r}), [{photos!r}], options=IndexOptions(batch_size={batch}, progress=False),
                ray_options=RayOptions(address={address!r}, staging={staging!r}))
"""


@needs_ray
def test_killed_run_resumes_to_the_local_end_state(ray_address, photos, local, tmp_path):
    home, staging = tmp_path / "home", tmp_path / "home" / "staging"
    code = _CHILD.format(home=str(home), photos=str(photos), batch=BATCH, address=ray_address, staging=str(staging))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        first = child.stdout.readline().split()
        second = child.stdout.readline().split()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert first[0] == "committed" and second == ["written"], (first, second)
    committed = int(first[1])
    leftover = [p for p in staged_files(home) if p.suffix == ".npy"]
    assert len(leftover) == 1  # the shard written but not committed
    written = len(np.load(leftover[0]))
    with Store.open(home=home) as store:
        assert len(store.images("default")) == committed  # the committed shard survived the kill
        from indexer.ray_executor import index_paths_ray

        resumed = index_paths_ray(
            store,
            [photos],
            options=None,
            ray_options=RayOptions(staging=str(staging)),
            batch_size=BATCH,
            progress=False,
        )
        got = state(store)
    assert (resumed.salvaged, resumed.unchanged) == (written, committed + written)
    assert resumed.indexed == 30 - committed - written
    assert resumed.skipped == local[0].skipped
    assert_same_collection(got, local[1])
    assert staged_files(home) == []


def test_the_actor_pool_leaves_a_core_for_decoding_and_fits_the_gpus():
    for cpus in (1, 2, 4, 16):
        for workers in (None, 1, 2, 3, 8, 64):
            plan = plan_resources(cpus, 0, RayOptions(workers=workers))
            assert plan.workers == (workers or max(1, cpus - 1)) and plan.device == "cpu"
            assert 0 < plan.decode_cpus and plan.workers * plan.worker_cpus + plan.decode_cpus <= cpus + 1e-9
    assert plan_resources(2, 0, RayOptions()).worker_cpus == 0.5
    gpu = plan_resources(16, 8, RayOptions(gpus_per_worker=0.5))
    assert (gpu.workers, gpu.worker_gpus, gpu.device) == (16, 0.5, "cuda")
    with pytest.raises(RayClusterError, match="9 workers x 1 GPUs need 9 GPUs; the cluster has 8: use --workers 8"):
        plan_resources(16, 8, RayOptions(workers=9, gpus_per_worker=1))
    with pytest.raises(RayClusterError, match="the cluster has 0 GPUs: use --gpus-per-worker 0"):
        plan_resources(16, 0, RayOptions(gpus_per_worker=1))
    with pytest.raises(RayClusterError, match="at least one encoder actor"):
        plan_resources(16, 0, RayOptions(workers=0))
