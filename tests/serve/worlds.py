"""A small demo-world collection indexed with the shipped model, shared by the service tests."""

from pathlib import Path

from indexer.world import LABELS_FILE, read_collection, write_collection
from storage import Store


def indexed_world(home: Path, images: int, seed: int = 0) -> dict[int, bool]:
    """Write `images` world images under `home`/world, index them as collection "default" with the
    shipped model and return {image id: is the shape outlined} from the world's labels file."""
    from indexer.pipeline import index_paths

    folder = home / "world"
    if not (folder / LABELS_FILE).is_file():
        write_collection(folder, images, seed=seed)
    outlined_by_path = {str(Path(path).resolve()): not attrs.filled for path, attrs in read_collection(folder)}
    with Store.open(home=home) as store:
        index_paths(store, [folder], progress=False)
        return {image.id: outlined_by_path[image.uri] for image in store.images("default")}
