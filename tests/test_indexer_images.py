"""Discovery and safe decoding on real files made with PIL: every mode, EXIF orientation, each kind of bad file."""

import io
import os

import numpy as np
import pytest
from indexer_fixtures import make_bad_files, make_images, picture
from PIL import Image

from indexer.errors import PathNotFoundError
from indexer.images import BadImageError, decode, discover, read_bytes


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGB", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("L", "JPEG"),
        ("1", "PNG"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("I;16", "PNG"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
        ("P", "GIF"),
    ],
)
def test_every_mode_decodes_to_rgb(mode, fmt):
    image = (
        picture(1, (20, 12)).convert(mode)
        if mode != "I;16"
        else Image.fromarray(np.arange(240, dtype=np.uint16).reshape(12, 20) * 273)
    )
    decoded, width, height = decode(_encoded(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (20, 12) and (width, height) == (20, 12)


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    decoded, _, _ = decode(_encoded(Image.fromarray(values), "PNG"))
    assert np.asarray(decoded)[0, :, 0].tolist() == [0, 100, 255]


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    decoded, _, _ = decode(_encoded(image, "PNG"))
    assert np.asarray(decoded).min() == 255


def test_exif_orientation_is_applied():
    wide = picture(2, (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded, width, height = decode(_encoded(wide, "JPEG", exif=exif, quality=95))
    assert decoded.size == (20, 40) and (width, height) == (20, 40)
    expected = np.asarray(wide.transpose(Image.Transpose.ROTATE_270), dtype=float)
    assert np.abs(np.asarray(decoded, dtype=float) - expected).mean() < 8  # JPEG noise only


def test_jpeg_draft_keeps_the_needed_side_and_reports_full_size():
    data = _encoded(picture(3, (400, 300)), "JPEG")
    decoded, width, height = decode(data, min_side=64)
    assert (width, height) == (400, 300)
    assert min(decoded.size) >= 64 and decoded.size[0] < 400  # decoded at a reduced DCT scale


def test_bad_files_raise_their_reason(tmp_path):
    for name, word in make_bad_files(tmp_path).items():
        with pytest.raises(BadImageError, match=word):
            decode(read_bytes(str(tmp_path / name)))


def test_pixel_limit_is_a_decompression_bomb():
    with pytest.raises(BadImageError, match=r"decompression bomb: 32x32 pixels exceeds the limit of 1000"):
        decode(_encoded(picture(4), "PNG"), max_pixels=1000)


def test_extreme_aspect_ratio_is_skipped():
    with pytest.raises(BadImageError, match=r"extreme aspect ratio: 1x60 \(limit 50:1\)"):
        decode(_encoded(picture(5, (1, 60)), "PNG"))


def test_discover_walks_recursively_by_extension(tmp_path):
    made = make_images(tmp_path, 6)
    (tmp_path / "readme.txt").write_text("not an image")
    (tmp_path / "UPPER.JPG").write_bytes(made[0].read_bytes())
    files, skips = discover([tmp_path])
    assert files == sorted(str(p) for p in [*made, tmp_path / "UPPER.JPG"]) and skips == []


def test_discover_reports_symlink_loops_and_broken_links(tmp_path):
    make_images(tmp_path / "a", 2)
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    os.symlink(tmp_path / "missing.jpg", tmp_path / "a" / "dangling.jpg")
    files, skips = discover([tmp_path])
    assert len(files) == 2
    reasons = {os.path.basename(s.path): s.reason for s in skips}
    assert reasons["loop"].startswith("symlink loop back to") and reasons["dangling.jpg"] == "broken symlink"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their permissions")
def test_discover_reports_unreadable_folders(tmp_path):
    make_images(tmp_path / "locked", 2)
    (tmp_path / "locked").chmod(0)
    try:
        files, skips = discover([tmp_path])
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert files == [] and skips[0].reason.startswith("unreadable folder")


def test_discover_takes_named_files_and_refuses_missing_paths(tmp_path):
    named = tmp_path / "photo.dat"
    named.write_bytes(b"x")
    assert discover([named]) == ([str(named)], [])
    with pytest.raises(PathNotFoundError, match="nowhere"):
        discover([tmp_path / "nowhere"])
