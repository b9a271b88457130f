"""Multi-crop views: the public API, determinism across restarts, and the photometric recipe."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from helpers import photo_jpeg
from PIL import Image

from swav import augment as A
from swav.multicrop import MultiCrop


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return photo_jpeg("astronaut", (400, 300))


def test_views_in_config_order_with_the_right_shapes(jpeg):
    mc = MultiCrop()
    views = mc(jpeg, "key-1", 0)
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    assert all(v.dtype == torch.float32 for v in views)
    # normalised with the recipe's mean/std: roughly centred, not in [0, 1]
    assert min(float(v.min()) for v in views) < -0.5


def test_views_depend_on_seed_key_and_pass_only(jpeg):
    mc = MultiCrop(seed=3)
    a, b = mc(jpeg, "k", 0), MultiCrop(seed=3)(jpeg, "k", 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "same (seed, key, pass): same views after a restart"
    assert not torch.equal(mc(jpeg, "k", 1)[0], a[0])
    assert not torch.equal(mc(jpeg, "other", 0)[0], a[0])
    assert not torch.equal(MultiCrop(seed=4)(jpeg, "k", 0)[0], a[0])


def test_batches_group_crops_by_resolution_crop_major(jpeg):
    mc = MultiCrop([32, 16], [2, 3], [0.3, 0.1], [1.0, 0.3], seed=0)
    items = [mc.crops_u8(jpeg, f"k{i}", 0) for i in range(4)]
    batch = mc.collate(items, [f"k{i}" for i in range(4)], augment=False)
    assert [tuple(x.shape) for x in batch.images] == [(8, 3, 32, 32), (12, 3, 16, 16)]
    assert batch.images[0].dtype == torch.uint8
    assert torch.equal(batch.images[0][1], items[1][0][0]) and torch.equal(batch.images[0][4], items[0][0][1])
    assert torch.equal(batch.images[1][5], items[1][0][3])


_LEVEL = 1 / 255 / min(A.STD)   # one uint8 step, after normalisation


def _agree(cpu: torch.Tensor, tensor: torch.Tensor) -> None:
    """The CPU (OpenCV, uint8 like the reference) and tensor (float) paths: same views up to rounding."""
    d = (cpu - tensor).abs()
    assert d.max() <= 2 * _LEVEL and d.mean() < 0.3 * _LEVEL, (float(d.max()), float(d.mean()))


def test_device_mode_equals_the_cpu_path_given_the_same_parameters(jpeg):
    mc = MultiCrop([32, 16], [2, 2], [0.3, 0.1], [1.0, 0.3], seed=0)
    items = [mc.crops_u8(jpeg, f"k{i}", 0) for i in range(6)]
    cpu = mc.collate(items, [], augment=True).augment()
    batch = mc.collate(items, [], augment=False)
    assert any(bool((p[:, A.FLIP] > 0).any()) for p in batch.params) and any(
        bool((p[:, 10] > 0).any()) for p in batch.params), "the sample exercises flips and blur"
    # what augment_on: device runs on the accelerator: the tensor path
    device = [A.photometric(im, p, method="tensor") for im, p in zip(batch.images, batch.params)]
    for a, b in zip(cpu, device):
        _agree(a, b)


def test_batcher_writes_what_collate_would_build_and_survives_a_bad_sample(jpeg):
    from swav.multicrop import CropBatcher

    mc = MultiCrop([32, 16], [2, 3], [0.3, 0.1], [1.0, 0.3], seed=0)
    keys = [f"k{i}" for i in range(4)]
    b = CropBatcher(mc, 4)
    for i, k in enumerate(keys):
        b.add(jpeg, k, 0)
        if i == 1:
            with pytest.raises(OSError):  # PIL.UnidentifiedImageError
                b.add(b"<html>not an image</html>", "bad", 0)
    assert b.full
    got = b.finish(augment=False)
    want = mc.collate([mc.crops_u8(jpeg, k, 0) for k in keys], keys, augment=False)
    assert got.keys == keys
    for x, y, px, py in zip(got.images, want.images, got.params, want.params):
        assert torch.equal(x, y) and torch.equal(px, py)
    short = CropBatcher(mc, 4)
    short.add(jpeg, "k0", 0)
    part = short.finish(augment=True)
    assert [tuple(x.shape) for x in part.images] == [(2, 3, 32, 32), (3, 3, 16, 16)]


def test_batches_are_the_same_without_the_private_resize_op(jpeg, monkeypatch):
    """The batcher resizes through a private aten op's out= form; if a torch release drops it, the
    public F.interpolate fallback must give the very same batch."""
    from swav import multicrop as M

    mc = MultiCrop([48, 24], [2, 3], [0.3, 0.1], [1.0, 0.3], seed=0)

    def batch():
        b = M.CropBatcher(mc, 3)
        for k in ("a", "b", "c"):
            b.add(jpeg, k, 0)
        return b.finish(augment=False).images

    assert M._RESIZE_OUT is not None   # the pinned torch has it (else this test checks nothing)
    fast = batch()
    monkeypatch.setattr(M, "_RESIZE_OUT", None)
    for x, y in zip(fast, batch()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("method", ["opencv", "tensor"])
def test_flip_is_applied_with_the_photometric_ops(jpeg, method):
    mc = MultiCrop([48], [6], [0.3], [1.0], seed=1)
    crops, p = mc.crops_u8(jpeg, "k", 0)
    params = torch.from_numpy(p)
    params[:, 10] = torch.linspace(0, 2.0, 6)   # blur too: it must commute with the flip
    flipped = params.clone()
    flipped[:, A.FLIP] = 1
    plain = params.clone()
    plain[:, A.FLIP] = 0
    x = torch.stack(crops)
    assert torch.allclose(A.photometric(x, flipped, method=method), A.photometric(x, plain, method=method).flip(-1),
                          atol=1e-5)
    assert torch.allclose(A.photometric(x.flip(-1), plain, method=method),
                          A.photometric(x, flipped, method=method), atol=_LEVEL * 1.01)


def test_photometric_parameter_distributions_follow_the_recipe():
    rng = np.random.default_rng(0)
    p = np.stack([A.sample_photometric(rng) for _ in range(20000)])
    assert abs(p[:, 0].mean() - 0.8) < 0.015      # colour jitter applied with p = 0.8
    assert abs(p[:, 9].mean() - 0.2) < 0.015      # grayscale p = 0.2
    blurred = p[:, 10] > 0
    assert abs(blurred.mean() - 0.5) < 0.015      # blur p = 0.5
    assert p[blurred, 10].min() >= 0.1 and p[blurred, 10].max() <= 2.0
    for col, (lo, hi) in zip((1, 2, 3, 4), ((0.2, 1.8), (0.2, 1.8), (0.2, 1.8), (-0.2, 0.2))):
        assert p[:, col].min() >= lo and p[:, col].max() <= hi
        assert abs(p[:, col].mean() - (lo + hi) / 2) < 0.02
    orders = {tuple(r) for r in p[:, 5:9].astype(int)}
    assert len(orders) == 24, "every order of the four jitter ops occurs"
    mc = MultiCrop(seed=1)
    flips = [box[4] for i in range(500) for box in mc.sample_params(f"k{i}", 0, 400, 300)[0]]
    assert abs(np.mean(flips) - 0.5) < 0.03
    # blur is configurable (its sigma is in output pixels, so small views want a smaller range)
    small = np.concatenate([MultiCrop(blur_prob=0.25, blur_sigma=(0.05, 0.5)).sample_params(f"k{i}", 0, 400, 300)[1]
                            for i in range(500)])
    assert abs((small[:, 10] > 0).mean() - 0.25) < 0.03 and small[:, 10].max() <= 0.5
    assert (MultiCrop(blur_prob=0.0).sample_params("k", 0, 400, 300)[1][:, 10] == 0).all()
    with pytest.raises(ValueError, match="blur_sigma"):
        MultiCrop(blur_sigma=(0.0, 1.0))


def _params(**kw) -> torch.Tensor:
    p = torch.zeros(1, A.N_PARAMS)
    p[0, 1:5] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    p[0, 5:9] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    for k, v in kw.items():
        p[0, {"jitter": 0, "b": 1, "c": 2, "s": 3, "h": 4, "gray": 9, "blur": 10}[k]] = v
    return p


@pytest.mark.parametrize("op,factor,reference", [
    ("b", 1.3, lambda x, f: TF.adjust_brightness(x, f)),
    ("c", 0.6, lambda x, f: TF.adjust_contrast(x, f)),
    ("s", 0.4, lambda x, f: TF.adjust_saturation(x, f)),
])
def test_each_colour_op_matches_torchvision(jpeg, op, factor, reference):
    img = TF.resize(TF.pil_to_tensor(Image.open(io.BytesIO(jpeg)).convert("RGB")), [64, 64])
    ours = A.photometric(img.unsqueeze(0), _params(jitter=1, **{op: factor}), normalize=False)[0]
    theirs = reference(img.float() / 255, factor)
    assert (ours - theirs).abs().mean() < 0.01


def test_hue_and_grayscale_and_blur(jpeg):
    img = TF.resize(TF.pil_to_tensor(Image.open(io.BytesIO(jpeg)).convert("RGB")), [64, 64]).unsqueeze(0)
    hue = A.photometric(img, _params(jitter=1, h=0.1), normalize=False)[0]
    theirs = TF.adjust_hue(img[0].float() / 255, 0.1)
    opposite = TF.adjust_hue(img[0].float() / 255, -0.1)
    # YIQ rotation vs torchvision's HSV: close, not equal, and turning the same way.
    assert (hue - theirs).abs().mean() < 0.07
    assert (hue - theirs).abs().mean() < 0.7 * (hue - opposite).abs().mean()
    assert (hue - img[0] / 255).abs().mean() > 0.02
    gray = A.photometric(img, _params(gray=1), normalize=False)[0]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])
    blur = A.photometric(img, _params(blur=1.5), normalize=False)[0]
    plain = A.photometric(img, _params(), normalize=False)[0]
    assert blur.std() < plain.std() and torch.allclose(blur.mean(), plain.mean(), atol=0.01)


def test_crop_geometry_follows_torchvision_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    width, height, scale = 400, 300, (0.14, 1.0)
    mc = MultiCrop([224], [1], [scale[0]], [scale[1]], seed=2)
    ours = np.array([mc.sample_params(f"k{i}", 0, width, height)[0][0][:4] for i in range(4000)], np.float64)
    img = torch.zeros(3, height, width)
    ref = np.array([RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(4000)], np.float64)
    for boxes in (ours, ref):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= height).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= width).all()
    area = lambda b: b[:, 2] * b[:, 3] / (width * height)  # noqa: E731
    aspect = lambda b: np.log(b[:, 3] / b[:, 2])  # noqa: E731
    assert area(ours).min() >= scale[0] * 0.97 and area(ours).max() <= 1.0
    assert abs(area(ours).mean() - area(ref).mean()) < 0.02
    assert abs(aspect(ours).mean() - aspect(ref).mean()) < 0.02
    assert abs(aspect(ours).std() - aspect(ref).std()) < 0.02
    centre = lambda b: (b[:, 1] + b[:, 3] / 2) / width  # noqa: E731
    assert abs(centre(ours).mean() - 0.5) < 0.02 and abs(centre(ours).std() - centre(ref).std()) < 0.02


def test_jpeg_and_lossless_inputs_give_the_same_crops(jpeg):
    """JPEGs take libjpeg-turbo (simplejpeg), other formats Pillow: the crops must agree."""
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(png, format="PNG")
    mc = MultiCrop([224, 96], [2, 2], [0.5, 0.05], [1.0, 0.14], seed=0)
    for key in ("a", "b", "c"):
        from_jpeg, pj = mc.crops_u8(jpeg, key, 0)
        from_png, pp = mc.crops_u8(png.getvalue(), key, 0)
        assert np.array_equal(pj, pp)
        for x, y in zip(from_jpeg, from_png):
            assert x.shape == y.shape and (x.float() - y.float()).abs().mean() < 1.5


def test_large_jpegs_are_decoded_reduced_by_a_power_of_two_with_the_same_crops():
    """A 1600x1200 JPEG whose crops all allow shrinking: the decode is halved (or more) in the DCT,
    never by a slow non-power-of-two eighth, and the crops still match a full-resolution decode."""
    from swav.demo_bucket import packaged_photos

    photo = dict(packaged_photos())["astronaut"].resize((1600, 1200))
    jpg, png = io.BytesIO(), io.BytesIO()
    photo.save(jpg, format="JPEG", quality=90)
    photo.save(png, format="PNG")
    jpg, png = jpg.getvalue(), png.getvalue()
    mc = MultiCrop([224, 96], [2, 2], [0.14, 0.03], [1.0, 0.3], seed=0)
    factors = set()
    for key in "abcdefghijkl":
        boxes, _ = mc.sample_params(key, 0, 1600, 1200)
        room = min(min(h, w) / s for (_, _, h, w, _), (s, _) in zip(boxes, mc.plan))
        decoded = mc._decode(jpg, boxes, 1600, 1200, None)
        factor = 1600 // decoded.shape[1]
        assert decoded.shape[:2] == (1200 // factor, 1600 // factor)
        assert factor in (2, 4, 8) and factor <= room < 2 * factor or factor == 8 <= room
        factors.add(factor)
        reduced, full = mc.crops_u8(jpg, key, 0)[0], mc.crops_u8(png, key, 0)[0]
        for x, y in zip(reduced, full):
            # Same place and content; the reduced box sits on the coarser pixel grid (up to one output
            # pixel off, where texture differs by ~10 levels), so compare on an 8x8 grid. Crops of
            # other keys differ there by 24-80 levels.
            pooled = [torch.nn.functional.adaptive_avg_pool2d(t[None].float(), 8) for t in (x, y)]
            assert x.shape == y.shape and (pooled[0] - pooled[1]).abs().mean() < 8.0
    assert len(factors) >= 2   # the keys above exercise more than one scale


def test_batched_blur_matches_torchvision_per_crop(jpeg):
    img = TF.pil_to_tensor(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    crops = torch.stack([TF.resized_crop(img, 10 * i, 20 * i, 120, 140, [48, 48]) for i in range(6)]).float() / 255
    sigma = torch.tensor([0.1, 0.4, 0.7, 1.0, 1.0, 2.0])     # several radii, one shared by two crops
    ours = A._gaussian_blur(crops, sigma)
    for i, s in enumerate(sigma.tolist()):
        r = max(1, int(np.ceil(3 * s)))
        ref = TF.gaussian_blur(crops[i], [2 * r + 1, 2 * r + 1], [s, s])
        assert torch.allclose(ours[i], ref, atol=1e-5), f"sigma {s}"


@pytest.mark.parametrize("size", [32, 160])
def test_tensor_path_for_accelerators_equals_the_opencv_cpu_path(jpeg, size):
    mc = MultiCrop([size], [4], [0.3], [1.0], seed=5)
    items = [mc.crops_u8(jpeg, f"k{i}", 0) for i in range(8)]
    batch = mc.collate(items, [], augment=False)
    params = batch.params[0].clone()
    params[::2, 10] = torch.linspace(0.3, 2.0, params[::2].shape[0])   # blur half of them
    _agree(A.photometric(batch.images[0], params, method="opencv"), A.photometric(batch.images[0], params, method="tensor"))
    with pytest.raises(ValueError, match="method"):
        A.photometric(batch.images[0], params, method="pil")


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (2, 1, 3, 0), (3, 2, 0, 1)])
def test_composed_jitter_then_grayscale_matches_torchvision_in_sequence(jpeg, order):
    """All of jitter's ops in one sampled order, then grayscale: the composed map equals torchvision
    applying them one after another (hue 0, factors that keep pixels off the clamp)."""
    img = TF.resize(TF.pil_to_tensor(Image.open(io.BytesIO(jpeg)).convert("RGB")), [64, 64])
    x = img.float() / 255
    factors = {0: 1.15, 1: 0.7, 2: 0.5, 3: 0.0}
    p = _params(jitter=1, b=factors[0], c=factors[1], s=factors[2], h=factors[3])
    p[0, 5:9] = torch.tensor([float(k) for k in order])
    ops = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation, 3: TF.adjust_hue}
    theirs = x
    for k in order:
        theirs = ops[k](theirs, factors[k])
    ours = A.photometric(img.unsqueeze(0), p, normalize=False)[0]
    assert (ours - theirs).abs().mean() < 0.01
    p[0, 9] = 1
    gray = A.photometric(img.unsqueeze(0), p, normalize=False)[0]
    assert (gray - TF.rgb_to_grayscale(theirs, 3)).abs().mean() < 0.01
    # the tensor path (augment_on: device) composes the same map
    assert (A.photometric(img.unsqueeze(0), p, normalize=False, method="tensor")[0] - gray).abs().max() < 1.5 / 255
