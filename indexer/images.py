"""Image discovery and safe decoding: every bad file or folder becomes a Skip(path, reason), never an exception."""

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from indexer.errors import PathNotFoundError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit, about 89.5 megapixels
MAX_ASPECT = 50  # longer side / shorter side; beyond it a resize to the model's input side would explode
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # scaled from 0..65535 to 0..255
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclass(frozen=True)
class Skip:
    """A file or folder left out of an index run, and why."""

    path: str
    reason: str


class BadImageError(Exception):
    """A file that cannot be decoded into an image; the message is the skip reason (internal, never raised out)."""


def discover(paths: list[str | os.PathLike], extensions=IMAGE_EXTENSIONS) -> tuple[list[str], list[Skip]]:
    """Absolute paths of image files (by extension) under `paths`, sorted, and the problems met on the way.

    Folders are walked recursively following symlinks; a symlink loop, a folder reached twice, an
    unreadable folder and a broken symlink are reported as Skips. A file named directly is taken
    whatever its extension. Raises PathNotFoundError when a named path does not exist.
    """
    files: set[str] = set()
    skips: list[Skip] = []
    seen_dirs: dict[tuple[int, int], str] = {}  # (device, inode) -> first path it was reached by
    for root in paths:
        root = os.path.abspath(root)
        if not os.path.exists(root):
            raise PathNotFoundError(f"path {root!r} does not exist")
        if not os.path.isdir(root):
            files.add(root)
            continue
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                st = os.stat(folder)
            except OSError as exc:
                skips.append(Skip(folder, f"unreadable folder: {exc.strerror}"))
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:
                first = seen_dirs[key]
                loop = folder.startswith(first + os.sep)
                skips.append(Skip(folder, ("symlink loop back to " if loop else "folder already walked as ") + first))
                continue
            seen_dirs[key] = folder
            try:
                with os.scandir(folder) as entries:
                    entries = list(entries)
            except OSError as exc:
                skips.append(Skip(folder, f"unreadable folder: {exc.strerror}"))
                continue
            for entry in entries:
                try:
                    if entry.is_dir():
                        stack.append(entry.path)
                    elif entry.is_file():
                        if os.path.splitext(entry.name)[1].lower() in extensions:
                            files.add(entry.path)
                    elif entry.is_symlink():
                        skips.append(Skip(entry.path, "broken symlink"))
                except OSError as exc:
                    skips.append(Skip(entry.path, f"unreadable: {exc.strerror}"))
    return sorted(files), sorted(skips, key=lambda s: s.path)


def read_bytes(path: str) -> bytes:
    """The file's bytes; raises BadImageError for an unreadable or empty file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadImageError(f"unreadable file: {exc.strerror or exc}") from None
    if not data:
        raise BadImageError("empty file (0 bytes)")
    return data


def decode(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
) -> tuple[Image.Image, int, int]:
    """Decode image bytes to (RGB image, width, height), EXIF orientation applied.

    width and height are the full image's, upright. `min_side` lets a JPEG decode at a reduced
    scale (DCT draft) while both sides stay at least that large: the encoder resizes down anyway.
    Raises BadImageError with the skip reason: not an image, decompression bomb, extreme aspect
    ratio, truncated, corrupt.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadImageError(f"decompression bomb: {exc}") from None
        except UnidentifiedImageError:
            raise BadImageError("not an image (format not recognised)") from None
        except Exception as exc:  # a malformed header raises whatever its plugin raises
            raise BadImageError(f"corrupt header: {exc}") from None
        width, height = image.size
        if width * height > max_pixels:
            raise BadImageError(f"decompression bomb: {width}x{height} pixels exceeds the limit of {max_pixels}")
        if max(width, height) > MAX_ASPECT * min(width, height):
            raise BadImageError(f"extreme aspect ratio: {width}x{height} (limit {MAX_ASPECT}:1)")
        try:
            orientation = image.getexif().get(0x0112)
            if min_side and image.format == "JPEG":
                image.draft("RGB", (min_side, min_side))
            image.load()
            image = to_rgb(ImageOps.exif_transpose(image))
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for bad data
            if "truncated" in str(exc):
                raise BadImageError(f"truncated: {exc}") from None
            raise BadImageError(f"corrupt: {type(exc).__name__}: {exc}") from None
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return image, width, height


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: transparency over white, 16-bit scaled (not clipped)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    elif image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")
