"""Helpers for the indexer tests: a tiny random-weight open_clip model and real image files, good and bad, made with PIL."""

import functools
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

TEST_MODEL = "clipbt-test-vit"  # tests/model_configs/clipbt-test-vit.json: ViT, width 64, 2 layers, 32 px, dim 32
CONFIG = Path(__file__).parent / "model_configs" / f"{TEST_MODEL}.json"


def register_test_model() -> None:
    """Make the tiny test architecture known to open_clip by name."""
    if TEST_MODEL not in open_clip.list_models():
        open_clip.add_model_config(CONFIG)


@functools.cache
def tiny_encoder():
    """The tiny model with its seeded random weights, on the CPU (loaded once per process)."""
    from indexer.encoder import Encoder

    torch.set_num_threads(1)
    register_test_model()
    return Encoder.load(TEST_MODEL, "random", "cpu")


def picture(seed: int, size=(32, 32)) -> Image.Image:
    """A small RGB image: a seeded colour gradient with noise, so every seed looks different."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3) + rng.uniform(-4, 4, 3) * xx[..., None] + rng.uniform(-4, 4, 3) * yy[..., None]
    return Image.fromarray(np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8))


def make_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    """n good images under `folder` (alternating PNG and JPEG, some in a subfolder)."""
    paths = []
    for i in range(start, start + n):
        sub = folder / ("sub" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / (f"img{i:03d}.png" if i % 2 else f"img{i:03d}.jpg")
        picture(i).save(path)
        paths.append(path)
    return paths


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 100_000) -> bytes:
    """A valid-header PNG claiming side x side pixels (10 gigapixels) in a few dozen bytes."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


def make_bad_files(folder: Path) -> dict[str, str]:
    """One file of each bad kind under `folder`: {file name: a word its skip reason must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    picture(99, (64, 64)).save(buffer, "JPEG")
    jpeg = buffer.getvalue()
    buffer = io.BytesIO()
    picture(98, (64, 64)).save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    idat = png.index(b"IDAT")
    png[idat + 8 : idat + 40] = bytes(32)  # zero part of the compressed data: the CRC no longer matches
    files = {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "notes.png": (b"these are notes, not pixels\n" * 20, "not an image"),
        "corrupt.png": (bytes(png), "corrupt"),
        "bomb.png": (bomb_png(), "decompression bomb"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: word for name, (_, word) in files.items()}


# `clipbt ARGS` in a process of its own, with the test model registered: `python -c CLIPBT_SCRIPT
# MODE ARGS...`. MODE "kill": SIGKILLed where `index_paths` would write the vector index, after
# its SQL commits; "run": plainly.
CLIPBT_SCRIPT = """
import os, signal, sys
import indexer.pipeline
from indexer_fixtures import register_test_model
from engine.cli import main

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

register_test_model()
if sys.argv[1] == "kill":
    indexer.pipeline.refresh = killed
main(sys.argv[2:])
"""


def clipbt_argv(mode: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of a `clipbt` process running CLIPBT_SCRIPT from this checkout."""
    import os
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    return [sys.executable, "-c", CLIPBT_SCRIPT, mode, *args], env
