"""Image preprocessing (Pillow + torch)."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastclip.transforms import (
    OPENAI_MEAN,
    OPENAI_STD,
    center_crop,
    image_transform,
    resize_center_crop,
    resize_short_side,
)


def _img(w, h, mode="RGB", seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def test_eval_shape_dtype_and_values():
    tf = image_transform(32)
    x = tf(_img(64, 48))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    solid = Image.new("RGB", (50, 70), (255, 0, 128))
    y = tf(solid)
    for c, v in enumerate((255, 0, 128)):
        torch.testing.assert_close(y[c], torch.full((32, 32), (v / 255 - OPENAI_MEAN[c]) / OPENAI_STD[c]))


def test_eval_is_resize_then_center_crop():
    img = _img(80, 40)
    ref = center_crop(img.resize((64, 32), Image.Resampling.BICUBIC), 32)
    expect = (torch.from_numpy(np.asarray(ref, dtype=np.float32) / 255).permute(2, 0, 1)
              - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)
    torch.testing.assert_close(image_transform(32)(img), expect)
    assert resize_short_side(_img(30, 90), 10).size == (10, 30)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "La", "PA", "RGBa", "I;16", "F"])   # La: Pillow's own error
def test_modes_converted_to_rgb(mode):
    assert image_transform(16)(_img(20, 20, mode)).shape == (3, 16, 16)
    assert image_transform(16, train=True)(_img(20, 20, mode)).shape == (3, 16, 16)


def test_train_seedable_and_random():
    img = _img(100, 80)
    a = [image_transform(32, train=True, generator=torch.Generator().manual_seed(1))(img) for _ in range(2)]
    torch.testing.assert_close(a[0], a[1])
    tf = image_transform(32, train=True, scale=(0.3, 0.5), generator=torch.Generator().manual_seed(2))
    b, c = tf(img), tf(img)
    assert b.shape == (3, 32, 32) and not torch.equal(b, c)


def test_custom_mean_std_and_errors():
    x = image_transform(8, mean=(0, 0, 0), std=(1, 1, 1))(Image.new("RGB", (8, 8), (255, 255, 255)))
    torch.testing.assert_close(x, torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match="image_size"):
        image_transform(0)
    for bad in (True, 8.0, "8"):
        with pytest.raises(ValueError, match="image_size must be a positive int"):
            image_transform(bad)
    # A size read from a NumPy array is an int like any other.
    img = Image.new("RGB", (9, 7), (10, 20, 30))
    assert torch.equal(image_transform(np.int64(8))(img), image_transform(8)(img))
    with pytest.raises(ValueError, match="scale"):
        image_transform(8, train=True, scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="PIL"):
        image_transform(8)(torch.zeros(3, 8, 8))


def test_thin_images_cost_the_crop_not_the_whole_resize(monkeypatch):
    """A 1x100000 image was resized whole to 224x22,400,000 (18.7 GiB) before the centre crop;
    only the crop's region is resampled now, and only past 2^24 resized pixels: below, the
    pixels are resize-then-crop's exactly (one resize with a box made tall images' vertical
    pass first: 25 levels off on a 20x1000 checkerboard)."""
    import fastclip.transforms as T
    rng = np.random.default_rng(0)
    thin = Image.fromarray(rng.integers(0, 255, (1, 100000, 3), dtype=np.uint8))
    assert image_transform(224)(thin).shape == (3, 224, 224)
    checker = ((np.add.outer(np.arange(1000), np.arange(20)) % 2) * 255).astype(np.uint8)
    cases = [(Image.fromarray(checker).convert("RGB"), 224)]
    for _ in range(6):
        a = int(rng.integers(1, 40))
        hw = (int(rng.integers(17 * a, 60 * a)), a)
        for shape in (hw, hw[::-1]):                # tall and wide, aspect 17 to 60
            cases.append((Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)),
                          int(rng.choice([16, 33, 64]))))
    for img, s in cases:
        want = np.asarray(center_crop(resize_short_side(img, s), s)).astype(int)
        assert np.array_equal(np.asarray(resize_center_crop(img, s)), want), (img.size, s)
    # Past the limit (forced here) the crop's region alone, within a level, upscaled or
    # downscaled, tall or wide (the horizontal pass made first in every case was 14 levels off
    # on tall downscales: the whole resize makes the vertical one first there).
    monkeypatch.setattr(T, "_WHOLE_RESIZE_MAX_PIXELS", 0)
    for k in range(24):
        s = int(rng.choice([16, 32, 48]))
        short = int(rng.integers(max(2, s // 3), 2 * s))          # below s: upscaled; above: down
        long_ = int(rng.integers(17 * short, 40 * short))
        shape = (long_, short) if k % 2 else (short, long_)
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "L")
        want = np.asarray(center_crop(resize_short_side(img, s), s)).astype(int)
        assert np.abs(np.asarray(resize_center_crop(img, s)).astype(int) - want).max() <= 1, (img.size, s)
    img, s = cases[0]
    want = np.asarray(center_crop(resize_short_side(img, s), s)).astype(int)
    assert np.abs(np.asarray(resize_center_crop(img, s)).astype(int) - want).max() <= 1
    # Mild aspects are resized whole past the limit too: a 3000x6000 photo at 2900 (16.8M
    # resized pixels) was 26 levels off through the crop's region.
    monkeypatch.setattr(T, "_WHOLE_RESIZE_MAX_PIXELS", 1 << 24)
    photo = Image.fromarray(rng.integers(0, 256, (6000, 3000), dtype=np.uint8), "L")
    want = np.asarray(center_crop(resize_short_side(photo, 2900), 2900))
    assert np.array_equal(np.asarray(resize_center_crop(photo, 2900)), want)


def test_wide_and_float_images_given_straight_to_the_transform():
    """Image.open(...) passed to the transform: a 16-bit ramp was clipped to white, a float
    image in 0..1 became black."""
    from fastclip.transforms import eight_bit
    ramp = (np.arange(1024, dtype=np.uint32) * 64).reshape(16, 64).astype(np.uint16)
    got = np.asarray(eight_bit(Image.fromarray(ramp)))
    np.testing.assert_allclose(got, ramp / 257.0, atol=0.5)
    unit = Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16))
    assert np.asarray(eight_bit(unit)).max() == 255
    t = image_transform(16)
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    pixels = t(Image.fromarray(ramp)) * std + mean
    assert 0.4 < pixels.mean().item() < 0.6
