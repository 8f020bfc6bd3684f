"""The one definition of preprocessing and augmentation, shared by training, evaluation, prediction and the app.

Images travel as uint8 pixels everywhere (``(B, 3, H, W)`` tensors, or ``(H, W, 3)`` arrays inside
albumentations); the only conversion to normalised floats is ``Normalize``, which lives inside the
LightningModule. So a checkpoint carries its own mean/std, and no path can normalise twice or forget to.

Two interchangeable augmentation back ends draw from the same distribution:

* ``albumentations``: the reference recipe, per sample, in the DataLoader.
* ``tensor``: the same ops on a whole uint8 batch at once on the training device. Hand-written because
  per-sample Python augmentation takes CPU time from the model (docs/results.md, "Throughput against the
  machine's ceiling").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

IMAGE_SIZE = 32  # pixels; every network here is built for 32x32 CIFAR inputs
MIN_CROP = 16  # pixels: the smallest training crop; every network here still has a map to pool at the end


@dataclass
class AugmentConfig:
    """Training augmentation: pad + random crop, horizontal flip, cutout filled with the dataset mean.

    The defaults are the seed recipe's (albumentations' old ``Cutout`` defaults: 8 holes of 8x8, p=0.5).
    """

    backend: Literal["albumentations", "tensor", "none"] = "tensor"
    """Where augmentation runs: per sample (albumentations), per batch on the device (tensor), or not at all."""
    pad: int = 4
    """Pixels of reflect padding before the random 32x32 crop, i.e. the largest translation."""
    flip: bool = True
    """Random horizontal flip with probability 0.5."""
    alternate_flips: bool = False
    """With ``flip``: airbench's alternating flips instead of random ones (tensor back end only). Each image is
    flipped at random in the first epoch, then the other way round in each next epoch, so every pair of epochs
    shows both orientations of every image (random flips leave a quarter of the images unflipped twice)."""
    cutout_holes: int = 8
    """Holes cut per image (when cutout fires)."""
    cutout_size: int = 8
    """Side of each square hole, pixels. 0 disables cutout."""
    cutout_p: float = 0.5
    """Probability that an image gets its holes."""
    early_crop: int = 0
    """Progressive resizing (tensor back end only): side, pixels, of a random square crop of each translated
    image in the first ``early_crop_epochs`` epochs; full-size images after. The networks end in a global
    max-pool, so they take any size; fewer pixels cost proportionally fewer FLOPs. 0: always full size."""
    early_crop_epochs: int = 0
    """Epochs trained on ``early_crop`` crops."""
    brightness: float = 0.0
    """Brightness jitter (tensor back end only; hiverge's CIFAR-10 speedrun: 0.14): each image is shifted by up to
    this many of the dataset's standard deviations, uniformly either way. 0: off."""
    contrast: float = 0.0
    """Contrast jitter (tensor back end only; hiverge: 0.13): each image's distance from the dataset mean is scaled
    by a factor drawn uniformly from 1 +- this. 0: off."""


# The epoch-dependent part of the augmentation policy, in one place: the data module and the dataset only ask.
def random_flips(cfg: AugmentConfig) -> bool:
    """Whether ``BatchAugment`` mirrors images at random (else they are mirrored by index: ``alternate_flip_mask``)."""
    return cfg.flip and not cfg.alternate_flips


def alternate_flip_mask(flip_first: torch.Tensor, epoch: int) -> torch.Tensor:
    """airbench's alternating flips: which of the images whose ``flip_first`` (bool) is given are served mirrored in
    ``epoch`` (0-based): those drawn in epoch 0, then the other way round in every next epoch."""
    return flip_first ^ bool(epoch % 2)


def crop_for_epoch(cfg: AugmentConfig, epoch: int) -> int | None:
    """The side of the training crop in ``epoch`` (progressive resizing), or ``None`` for full-size images."""
    return cfg.early_crop if cfg.early_crop and epoch < cfg.early_crop_epochs else None


class Normalize(nn.Module):
    """uint8 pixels ``(B, 3, H, W)`` -> float ``(x / 255 - mean) / std``. Float inputs are taken as 0..255 too.

    ``mean`` and ``std`` are buffers, so they are saved in (and restored from) every checkpoint.
    """

    def __init__(self, mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.25, 0.25, 0.25)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    @torch.no_grad()
    def set_stats(self, mean, std) -> None:
        """Copy dataset statistics (0..1 scale, one value per channel) into the buffers."""
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = (1.0 / (255.0 * self.std)).view(1, -1, 1, 1)
        shift = (self.mean / self.std).view(1, -1, 1, 1)
        return x.float() * scale - shift


def mean_fill(mean) -> tuple[int, int, int]:
    """The dataset mean as a uint8 RGB colour: what cutout fills holes with (it normalises to ~0)."""
    return tuple(int(round(float(m) * 255)) for m in mean)


def albumentations_pipeline(cfg: AugmentConfig, mean, seed: int | None = None):
    """The reference per-sample training pipeline on an ``(H, W, 3)`` uint8 array -> ``(3, H, W)`` uint8 tensor.

    ``strict=True`` makes a misspelled or renamed argument an error: albumentations 2.x otherwise
    ignores old argument names (``max_holes``, ``fill_value``, ...) with only a warning.
    """
    import albumentations as A  # heavy, and only training needs it: the app and predict never import it
    import cv2  # albumentations' image backend, for the border mode
    from albumentations.pytorch import ToTensorV2  # with albumentations

    size = IMAGE_SIZE
    ops = [
        A.PadIfNeeded(min_height=size + 2 * cfg.pad, min_width=size + 2 * cfg.pad,
                      border_mode=cv2.BORDER_REFLECT_101),
        A.RandomCrop(height=size, width=size),
    ]
    if cfg.flip:
        ops.append(A.HorizontalFlip(p=0.5))
    if cfg.cutout_size > 0 and cfg.cutout_holes > 0:
        ops.append(A.CoarseDropout(num_holes_range=(cfg.cutout_holes, cfg.cutout_holes),
                                   hole_height_range=(cfg.cutout_size, cfg.cutout_size),
                                   hole_width_range=(cfg.cutout_size, cfg.cutout_size),
                                   fill=mean_fill(mean), p=cfg.cutout_p))
    ops.append(ToTensorV2())
    return A.Compose(ops, strict=True, seed=seed)


class BatchAugment(nn.Module):
    """The same augmentation as ``albumentations_pipeline``, on a whole uint8 batch ``(B, 3, H, W)`` at once.

    Translation by up to ``pad`` pixels with reflection at the border (equal to reflect-pad + random crop),
    a horizontal flip per image, brightness and contrast jitter (this back end only), and cutout holes filled with
    the dataset mean. Randomness comes from
    torch's generator on the batch's device, so ``seed_everything`` makes it reproducible.
    """

    def __init__(self, cfg: AugmentConfig, mean, std=(0.25, 0.25, 0.25)):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("fill", torch.tensor(mean_fill(mean), dtype=torch.uint8), persistent=False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255, persistent=False)

    def forward(self, x: torch.Tensor, crop: int | None = None) -> torch.Tensor:
        """Augment uint8 ``x`` ``(B, 3, H, W)``; with ``crop``, return a random ``(B, 3, crop, crop)`` part of each
        translated image (progressive resizing)."""
        cfg = self.cfg
        b, _, h, w = x.shape
        dev = x.device
        out_h, out_w = (crop, crop) if crop else (h, w)
        if cfg.pad > 0 or (out_h, out_w) != (h, w):
            # Source row/col of every output pixel: shift, then reflect into range (reflect-101, as cv2/torch).
            shift_y = torch.randint(-cfg.pad, cfg.pad + h - out_h + 1, (b, 1), device=dev)
            shift_x = torch.randint(-cfg.pad, cfg.pad + w - out_w + 1, (b, 1), device=dev)
            rows = _reflect(torch.arange(out_h, device=dev) + shift_y, h)  # (B, out_h)
            cols = _reflect(torch.arange(out_w, device=dev) + shift_x, w)  # (B, out_w)
            h, w = out_h, out_w
            if random_flips(cfg):  # (alternating flips happen in the dataset, by index)
                flip = torch.rand(b, 1, device=dev) < 0.5
                cols = torch.where(flip, cols.flip(1), cols)
            batch = torch.arange(b, device=dev).view(b, 1, 1)
            x = x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, 3, out_h, out_w)
        elif random_flips(cfg):
            flip = torch.rand(b, 1, 1, 1, device=dev) < 0.5
            x = torch.where(flip, x.flip(3), x)
        if cfg.brightness > 0 or cfg.contrast > 0:
            # hiverge's jitter of normalised images, (z + shift) * scale, done on the pixels: with z = (x - mean) / std
            # that is mean + (x - mean + shift * std) * scale, rounded back to uint8 (clipped at 0 and 255).
            shift = (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * cfg.brightness
            scale = 1 + (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * cfg.contrast
            y = (x.float() - self.mean + shift * self.std) * scale + self.mean
            x = y.round_().clamp_(0, 255).to(torch.uint8)
        if cfg.cutout_size > 0 and cfg.cutout_holes > 0 and cfg.cutout_p > 0:
            s, k = cfg.cutout_size, cfg.cutout_holes
            top = torch.randint(0, h - s + 1, (b, k, 1), device=dev)
            left = torch.randint(0, w - s + 1, (b, k, 1), device=dev)
            ys = torch.arange(h, device=dev)
            xs = torch.arange(w, device=dev)
            in_rows = (ys >= top) & (ys < top + s)  # (B, K, H)
            in_cols = (xs >= left) & (xs < left + s)  # (B, K, W)
            hole = (in_rows[:, :, :, None] & in_cols[:, :, None, :]).any(1)  # (B, H, W)
            hole &= (torch.rand(b, 1, 1, device=dev) < cfg.cutout_p)
            x = torch.where(hole[:, None], self.fill.view(1, -1, 1, 1), x)
        return x.contiguous()


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Map indices in [-n+1, 2n-2] into [0, n-1] by reflection without repeating the edge."""
    idx = idx.abs()
    return torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)


def pil_to_uint8(img: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """Any PIL image -> ``(size, size, 3)`` uint8 RGB, resized with antialiasing when it is not that size."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
    return np.asarray(img, dtype=np.uint8)


def to_batch(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 array -> ``(N, 3, H, W)`` uint8 tensor, the model's input format."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
