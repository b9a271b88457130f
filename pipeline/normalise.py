"""Validate one raw object and turn it into an upright RGB JPEG of bounded size.

Pure function of (bytes, config): it runs in worker processes and must give the
same output bytes for the same input on every machine with the same Pillow.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# We enforce our own pixel limit before decoding; Pillow's global one would warn
# or raise at a different threshold than the user configured.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "TIFF", "BMP"})
_ORIENTATION = 0x0112


@dataclass(frozen=True)
class NormaliseConfig:
    max_side: int = 512          # longer side after resizing (aspect kept)
    min_side: int = 32           # shorter side below this is rejected (too_small)
    max_aspect: float = 4.0      # longer/shorter above this is rejected (bad_aspect)
    max_pixels: int = 100_000_000  # header width*height above this is refused undecoded
    quality: int = 90            # JPEG quality of re-encoded images
    background: tuple[int, int, int] = (255, 255, 255)  # what transparency is flattened onto


def _reject(reason: str, detail: str, **extra) -> dict:
    return {"status": "rejected", "reason": reason, "detail": detail[:300], **extra}


def decode_job(data: bytes, cfg: NormaliseConfig) -> dict:
    """What a decoder process runs. It calls normalise() through this module, so a test can wrap it
    (tests/faults) in every decoder process."""
    return normalise(data, cfg)


def normalise(data: bytes, cfg: NormaliseConfig) -> dict:
    """{"status": "accepted", "jpg", "sha256", "width", "height", ...} or a named rejection."""
    if not data:
        return _reject("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return _reject("not_an_image", "no image decoder recognises these bytes")
    except Exception as e:  # noqa: BLE001 - any decoder failure is a property of the input
        return _reject("corrupt", f"{type(e).__name__}: {e}")
    fmt = img.format or "unknown"
    if fmt not in ACCEPTED_FORMATS:
        return _reject("unsupported_format", f"format {fmt}")
    w, h = img.size
    if w * h > cfg.max_pixels:
        return _reject("too_many_pixels", f"{w}x{h} exceeds {cfg.max_pixels} pixels",
                       width=w, height=h)
    try:
        return _decode_and_encode(data, img, fmt, cfg)
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}"
        reason = "truncated" if "truncat" in msg.lower() or isinstance(e, EOFError) else "corrupt"
        return _reject(reason, msg, width=w, height=h)


def _decode_and_encode(data: bytes, img: Image.Image, fmt: str, cfg: NormaliseConfig) -> dict:
    frames = getattr(img, "n_frames", 1)
    orientation = img.getexif().get(_ORIENTATION, 1) if fmt in ("JPEG", "MPO", "TIFF", "WEBP", "PNG") else 1
    raw_w, raw_h = img.size
    upright_w, upright_h = (raw_h, raw_w) if orientation in (5, 6, 7, 8) else (raw_w, raw_h)
    short, long_ = min(upright_w, upright_h), max(upright_w, upright_h)
    if short < cfg.min_side:
        return _reject("too_small", f"{upright_w}x{upright_h} shorter side < {cfg.min_side}",
                       width=upright_w, height=upright_h)
    if long_ / short > cfg.max_aspect:
        return _reject("bad_aspect", f"{upright_w}x{upright_h} aspect > {cfg.max_aspect}",
                       width=upright_w, height=upright_h)

    passthrough = (fmt == "JPEG" and img.mode == "RGB" and orientation == 1 and long_ <= cfg.max_side)
    if fmt == "JPEG" and long_ > 2 * cfg.max_side:
        # DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 while staying >= max_side.
        scale = long_ / cfg.max_side
        img.draft("RGB", (int(raw_w / scale) + 1, int(raw_h / scale) + 1))
    img.load()  # full decode: this is the validation
    if passthrough:
        out = data
        out_w, out_h = raw_w, raw_h
    else:
        img = ImageOps.exif_transpose(img) if orientation != 1 else img
        img = _to_rgb(img, cfg.background)
        if max(img.size) > cfg.max_side:
            img.thumbnail((cfg.max_side, cfg.max_side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=cfg.quality)
        out = buf.getvalue()
        out_w, out_h = img.size
    return {
        "status": "accepted", "reason": None, "detail": None, "jpg": out,
        "sha256": hashlib.sha256(out).hexdigest(), "width": upright_w, "height": upright_h,
        "out_width": out_w, "out_height": out_h, "format": fmt, "frames": frames,
        "passthrough": passthrough,
    }


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            if mode == "I" and lo >= 0 and hi <= 255:
                pass
            elif mode == "I" and lo >= 0 and hi <= 65535:
                arr = arr / 257.0
            else:
                arr = (arr - lo) / ((hi - lo) or 1.0) * 255.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode == "P":
        return img.convert("RGB")
    if mode in ("LA", "PA", "La"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        canvas = Image.new("RGB", img.size, background)
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB")
