"""Thumbnails made with Pillow and cached under the data home, named by image id only; a placeholder for images without a readable file."""

import io
import os
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from indexer.images import BadImageError, decode, read_bytes
from storage import Store

MEDIA_TYPE = "image/jpeg"


class Thumbnails:
    """JPEG thumbnails of a store's images in `folder`/<image id>.jpg.

    The file read is the one the store recorded for the image (its uri), never a path from a
    request. An image whose file is gone or unreadable (e.g. imported embeddings) gets the
    placeholder, which is not cached, so a file that comes back is shown.
    """

    def __init__(self, store: Store, folder: Path, size: int = 256):
        self.store, self.folder, self.size = store, Path(folder), size
        self.folder.mkdir(parents=True, exist_ok=True)
        self._placeholder = placeholder(size)

    def get(self, image_id: int) -> bytes:
        """The thumbnail of live image `image_id` (the caller checked it belongs to its collection)."""
        cached = self.folder / f"{int(image_id)}.jpg"
        try:
            return cached.read_bytes()
        except FileNotFoundError:
            pass
        uri = self.store.image(image_id).uri
        try:
            picture, _, _ = decode(read_bytes(uri), min_side=self.size)
        except BadImageError:
            return self._placeholder
        picture.thumbnail((self.size, self.size))
        data = _jpeg(picture)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".part")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, cached)  # atomic: a concurrent reader sees the whole file or none
        return data


def placeholder(size: int) -> bytes:
    """A grey square with a crossed frame: 'no picture for this image'."""
    picture = Image.new("RGB", (size, size), (226, 228, 232))
    draw = ImageDraw.Draw(picture)
    m = size // 8
    draw.rectangle([m, m, size - m, size - m], outline=(160, 164, 172), width=max(1, size // 64))
    draw.line([m, m, size - m, size - m], fill=(160, 164, 172), width=max(1, size // 64))
    draw.line([m, size - m, size - m, m], fill=(160, 164, 172), width=max(1, size // 64))
    return _jpeg(picture)


def _jpeg(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=85)
    return out.getvalue()
