"""Uncurated buckets made from real images that ship inside Python packages.

Used by the demo, the tests and the benchmarks: photos from scikit-image and
scikit-learn at realistic sizes, plus every odd or broken input a real bucket
holds (empty files, HTML saved as .jpg, truncated streams, bombs, CMYK, 16-bit,
palette transparency, animations, rotations, duplicates, unicode names).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.order import order_key


def _skimage_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def _sklearn_dir() -> Path:
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "images"


def packaged_photos() -> list[tuple[str, Image.Image]]:
    """(name, RGB image) for every colour-or-grey photo file shipped in scikit-image and scikit-learn."""
    out = []
    for folder in (_skimage_dir(), _sklearn_dir()):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                continue
            with Image.open(path) as im:
                im.load()
                if min(im.size) < 64:
                    continue
                out.append((path.stem, im.convert("RGB")))
    return out


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=kw.pop("quality", 90), **kw)
    return buf.getvalue()


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header claims a huge canvas (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def photo_bucket(root: str | os.PathLike, count: int, seed: int = 0, min_side: int = 400,
                 max_side: int = 2000) -> list[Path]:
    """`count` JPEG photos resized to random sizes in [min_side, max_side], in a few nested prefixes."""
    rng = np.random.default_rng(seed)
    photos = packaged_photos()
    root = Path(root)
    written = []
    for i in range(count):
        name, img = photos[i % len(photos)]
        longer = int(rng.integers(min_side, max_side + 1))
        scale = longer / max(img.size)
        size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
        crop = img.resize(size, Image.Resampling.BILINEAR)
        if i >= len(photos):  # vary content so copies of one photo are not exact duplicates
            crop = crop.rotate(float(rng.uniform(-8, 8)), expand=False)
        path = root / f"batch{i % 3}" / f"{name}_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(crop, quality=int(rng.integers(80, 96))))
        written.append(path)
    return written


def odd_cases(root: str | os.PathLike, rel_prefix: str = "") -> dict[str, str | None]:
    """Write every odd input kind under root; returns {relative path: expected rejection reason or None}.

    rel_prefix: root's path relative to the build's source, which decides the pack order and so
    which of the duplicate copies is kept (the first in the default seed's order).
    """
    root = Path(root)
    photo = dict(packaged_photos())["chelsea"]  # a cat, 451x300
    small = photo.resize((300, 200))
    good_jpeg = _jpeg(small)
    cases: dict[str, tuple[bytes, str | None]] = {
        "odd/zero-byte.jpg": (b"", "empty"),
        "odd/truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "truncated"),
        "odd/error-page.jpg": (b"<!DOCTYPE html><html><body><h1>503 Service Unavailable</h1></body></html>",
                               "not_an_image"),
        "odd/notes.txt": (b"just some text that someone uploaded\n" * 10, "not_an_image"),
        "odd/bomb-50000x50000.png": (_png_claiming(50000, 50000), "too_many_pixels"),
        "odd/one-pixel.png": (_png(Image.new("RGB", (1, 1), (255, 0, 0))), "too_small"),
        "odd/sliver-1x5000.png": (_png(Image.new("RGB", (1, 5000), (0, 255, 0))), "too_small"),
        "odd/banner-2000x100.png": (_png(Image.new("RGB", (2000, 100), (0, 0, 255))), "bad_aspect"),
        "odd/cmyk.jpg": (_jpeg(small.convert("CMYK")), None),
        "odd/grey-16bit.png": (_png(Image.fromarray(
            (np.asarray(small.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))), None),
        "odd/palette-transparent.png": (_palette_with_transparency(small), None),
        "odd/rgba.png": (_png(_with_alpha(small.rotate(30))), None),
        "odd/grey-la.png": (_png(_with_alpha(small.rotate(60)).convert("LA")), None),
        "odd/grayscale.jpg": (_jpeg(small.convert("L")), None),
        "odd/progressive.jpg": (_jpeg(small.rotate(90, expand=True), progressive=True), None),
        "odd/animated.gif": (_animated_gif(small), None),
        "odd/multipage.tif": (_multipage_tiff(small), None),
        "odd/exif-rotated.jpg": (_exif_rotated(small), None),
        "odd/photo.webp": (_webp(small), None),
        "odd/photo.bmp": (_bmp(small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), None),
        "odd/favicon.ico": (_ico(small), "unsupported_format"),
        "odd/bad-crc.png": (_bad_crc_png(small), "corrupt"),
        # Three copies: the first in the default pack order is kept (set below).
        "odd/dups/a-original.jpg": (good_jpeg, "duplicate"),
        "odd/dups/copy of original.jpg": (good_jpeg, "duplicate"),
        "odd/dups/z-another-copy.jpg": (good_jpeg, "duplicate"),
        "odd/ünïcødé name with spaces.jpg": (_jpeg(small.transpose(Image.Transpose.FLIP_TOP_BOTTOM)), None),
        "odd/deeply/nested/prefix/leaf.png": (_png(small.rotate(180)), None),
    }
    dups = sorted((r for r in cases if r.startswith("odd/dups/")), key=lambda r: order_key(0, rel_prefix + r))
    cases[dups[0]] = (good_jpeg, None)
    out = {}
    for rel, (data, reason) in cases.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        out[rel] = reason
    return out


def _with_alpha(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, img.size[0], dtype=np.uint8), (img.size[1], 1))
    rgba.putalpha(Image.fromarray(alpha, "L"))
    return rgba


def _multipage_tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.rotate(5).save(buf, format="TIFF", save_all=True, append_images=[img.rotate(10), img.rotate(20)])
    return buf.getvalue()


def _palette_with_transparency(img: Image.Image) -> bytes:
    p = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return _png(p, transparency=0)


def _animated_gif(img: Image.Image) -> bytes:
    frames = [img.rotate(a).convert("P", palette=Image.Palette.ADAPTIVE) for a in (0, 20, 40)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _exif_rotated(img: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored sideways
    return _jpeg(img, exif=exif.tobytes())


def _webp(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="WEBP", quality=85)
    return buf.getvalue()


def _bmp(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="BMP")
    return buf.getvalue()


def _ico(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="ICO", sizes=[(64, 64)])
    return buf.getvalue()


def _bad_crc_png(img: Image.Image) -> bytes:
    data = bytearray(_png(img))
    idat = data.find(b"IDAT")
    data[idat + 10] ^= 0xFF  # flip payload bits; the stored CRC no longer matches
    return bytes(data)


def digits_folder(root: str | os.PathLike, split: str = "all", size: int = 64, limit: int = 0) -> int:
    """scikit-learn's handwritten digits as PNG files, one sub-folder per class; returns files written.

    split 'train'/'val' takes alternate images so both halves cover every class.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    n = 0
    for i, (im, label) in enumerate(zip(digits.images, digits.target)):
        if split == "train" and i % 2 == 1 or split == "val" and i % 2 == 0:
            continue
        if limit and n >= limit:
            break
        arr = (255 - im * 255 / 16).astype(np.uint8)  # dark ink on white, like a scan
        pic = Image.fromarray(arr, "L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        path = root / str(int(label)) / f"digit_{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(pic))
        n += 1
    return n
