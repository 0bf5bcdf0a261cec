"""Image preprocessing (Pillow + torch)."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastclip.transforms import OPENAI_MEAN, OPENAI_STD, center_crop, image_transform, resize_short_side


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


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
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
    with pytest.raises(ValueError, match="scale"):
        image_transform(8, train=True, scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="PIL"):
        image_transform(8)(torch.zeros(3, 8, 8))
