import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifarlab.transforms import (
    AugmentConfig,
    BatchAugment,
    Normalize,
    albumentations_pipeline,
    mean_fill,
    pil_to_uint8,
)

MEAN = (0.4913, 0.4821, 0.4465)


def _images(n=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_albumentations_output_is_uint8_chw():
    out = albumentations_pipeline(AugmentConfig(), MEAN, seed=0)(image=_images(1)[0])["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


def test_albumentations_cutout_fills_with_the_mean():
    cfg = AugmentConfig(pad=0, flip=False, cutout_holes=1, cutout_size=8, cutout_p=1.0)
    # An image with no pixel equal to the fill colour: every fill-coloured pixel is cutout's.
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    out = albumentations_pipeline(cfg, MEAN, seed=0)(image=img)["image"].permute(1, 2, 0).numpy()
    filled = (out == np.array(mean_fill(MEAN))).all(-1)
    assert filled.sum() == 64  # exactly one 8x8 hole, holding the mean colour


def test_albumentations_is_reproducible_with_a_seed():
    img = _images(1)[0]
    a = [albumentations_pipeline(AugmentConfig(), MEAN, seed=7)(image=img)["image"] for _ in range(2)]
    b = albumentations_pipeline(AugmentConfig(), MEAN, seed=8)(image=img)["image"]
    assert torch.equal(a[0], a[1])
    assert not torch.equal(a[0], b)


def test_albumentations_strict_rejects_old_argument_names():
    import albumentations as A

    with pytest.raises(ValueError, match="max_holes"):
        A.Compose([A.CoarseDropout(max_holes=8)], strict=True)


def test_batch_augment_cutout_fills_with_the_mean():
    cfg = AugmentConfig(pad=0, flip=False, cutout_holes=1, cutout_size=8, cutout_p=1.0)
    x = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    out = BatchAugment(cfg, MEAN)(x)
    filled = (out == torch.tensor(mean_fill(MEAN)).view(1, 3, 1, 1)).all(1)  # (B, H, W)
    assert filled.sum(dim=(1, 2)).tolist() == [64] * 4


def test_batch_augment_translation_matches_reflect_pad_and_crop():
    cfg = AugmentConfig(pad=4, flip=False, cutout_size=0)
    x = torch.from_numpy(_images(8)).permute(0, 3, 1, 2).contiguous()
    torch.manual_seed(3)
    out = BatchAugment(cfg, MEAN)(x)
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(len(x)):
        crops = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], c) for c in crops), f"image {i} is not a reflect-padded crop"


@pytest.mark.parametrize("pad, crop", [(2, 24), (0, 20), (2, 32)])
def test_batch_augment_crop_is_a_window_of_the_translated_image(pad, crop):
    """Progressive resizing: a crop x crop window anywhere in the reflect-padded image (translation included)."""
    cfg = AugmentConfig(pad=pad, flip=False, cutout_size=0)
    x = torch.from_numpy(_images(8)).permute(0, 3, 1, 2).contiguous()
    torch.manual_seed(5)
    out = BatchAugment(cfg, MEAN)(x, crop)
    assert out.shape == (8, 3, crop, crop) and out.dtype == torch.uint8
    padded = F.pad(x, (pad,) * 4, mode="reflect") if pad else x
    span = range(32 + 2 * pad - crop + 1)
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + crop, dx:dx + crop] for dy in span for dx in span]
        assert any(torch.equal(out[i], w) for w in windows), f"image {i} is not a window of the padded image"


def test_batch_augment_flip_only_flips():
    cfg = AugmentConfig(pad=0, flip=True, cutout_size=0)
    x = torch.from_numpy(_images(64)).permute(0, 3, 1, 2).contiguous()
    out = BatchAugment(cfg, MEAN)(x)
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(3)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 10 < int(flipped.sum()) < 54  # about half


def test_batch_augment_is_reproducible_with_a_seed():
    x = torch.from_numpy(_images(8)).permute(0, 3, 1, 2).contiguous()
    aug = BatchAugment(AugmentConfig(), MEAN)
    torch.manual_seed(0)
    a = aug(x)
    torch.manual_seed(0)
    b = aug(x)
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_normalize_maps_the_mean_colour_to_zero():
    std = (0.25, 0.25, 0.26)
    norm = Normalize(MEAN, std)
    x = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    torch.testing.assert_close(norm(x), torch.zeros(1, 3, 1, 1), atol=1e-5, rtol=0)
    white = norm(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)).flatten()
    torch.testing.assert_close(white, (1 - torch.tensor(MEAN)) / torch.tensor(std))


def test_pil_to_uint8_converts_mode_and_size():
    from PIL import Image

    img = Image.new("L", (100, 60), color=200)
    out = pil_to_uint8(img)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and (out == 200).all()


def test_the_epoch_policy_lives_in_transforms():
    from cifarlab.transforms import AugmentConfig, alternate_flip_mask, crop_for_epoch, random_flips

    first = torch.tensor([True, False, True])
    assert alternate_flip_mask(first, 0).tolist() == [True, False, True]
    assert alternate_flip_mask(first, 1).tolist() == [False, True, False]  # the other way round
    assert alternate_flip_mask(first, 4).tolist() == first.tolist()
    cfg = AugmentConfig(early_crop=24, early_crop_epochs=2)
    assert [crop_for_epoch(cfg, e) for e in range(4)] == [24, 24, None, None]
    assert crop_for_epoch(AugmentConfig(), 0) is None
    assert random_flips(AugmentConfig()) and not random_flips(AugmentConfig(alternate_flips=True))
    assert not random_flips(AugmentConfig(flip=False))


@pytest.mark.parametrize("brightness, contrast", [(0.14, 0.13), (0.5, 0.0), (0.0, 0.3)])
def test_batch_augment_brightness_contrast_is_hiverge_jitter_of_the_normalised_image(brightness, contrast):
    """Each image, normalised, comes out as (z + shift) * scale: shift within +-brightness, scale 1 +- contrast."""
    std = (0.2, 0.25, 0.3)
    cfg = AugmentConfig(pad=0, flip=False, cutout_size=0, brightness=brightness, contrast=contrast)
    torch.manual_seed(7)
    x = torch.randint(70, 180, (64, 3, 32, 32), dtype=torch.uint8)  # mid-range: nothing is clipped
    out = BatchAugment(cfg, MEAN, std)(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    m = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    s = torch.tensor(std).view(1, 3, 1, 1) * 255
    z_in, z_out = ((x.float() - m) / s).flatten(1), ((out.float() - m) / s).flatten(1)
    shifts, scales = [], []
    for a, b in zip(z_in, z_out):  # least squares b = scale * a + offset, per image
        design = torch.stack([a, torch.ones_like(a)], 1)
        scale, offset = torch.linalg.lstsq(design, b[:, None]).solution.squeeze(1).tolist()
        residual = (design @ torch.tensor([scale, offset]) - b).abs().max()
        assert residual <= 1 / s.min()  # uint8 rounding; the fit pools the channels
        scales.append(scale)
        shifts.append(offset / scale)
    shifts, scales = torch.tensor(shifts), torch.tensor(scales)
    assert shifts.abs().max() <= brightness + 0.01 and (scales - 1).abs().max() <= contrast + 0.01
    # Drawn uniformly over the range, not stuck at its middle.
    assert shifts.abs().max() >= 0.7 * brightness and (scales - 1).abs().max() >= 0.7 * contrast


def test_brightness_contrast_need_the_tensor_back_end():
    from cifarlab.data import CIFARDataModule
    from cifarlab.errors import ConfigError

    with pytest.raises(ConfigError, match="backend tensor"):
        CIFARDataModule(augment=AugmentConfig(backend="albumentations", brightness=0.1))
    with pytest.raises(ConfigError, match="contrast"):
        CIFARDataModule(augment=AugmentConfig(contrast=1.5))
