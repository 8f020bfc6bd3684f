"""The near-duplicate matcher on tiny synthetic images: edited copies match their original above the threshold,
different objects on the same background do not, and an image never matches itself."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cifarlab import duplicates


def textured(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    """``(n, 32, 32, 3)`` uint8 images of coloured noise smoothed at several scales: detail everywhere."""
    out = np.zeros((n, 3, 32, 32), np.float32)
    for cells in (4, 8, 16):
        noise = torch.from_numpy(rng.normal(size=(n, 3, cells, cells)).astype(np.float32))
        out += F.interpolate(noise, size=(32, 32), mode="bicubic", align_corners=False).numpy()
    out = (out - out.mean()) / out.std()
    return np.clip(128 + 45 * out, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def seascape(rng: np.random.Generator) -> np.ndarray:
    """A pale sky over a darker sea (a horizon at row 18, the same in every image) with a dark boat of random shape
    and texture on it."""
    y = np.arange(32, dtype=np.float32)[:, None, None]
    sky = np.array([150, 180, 220], np.float32) + 0.8 * y
    sea = np.array([40, 70, 110], np.float32) + 0.5 * (y - 18)
    img = np.where(y < 18, sky, sea) * np.ones((1, 32, 1), np.float32)
    img += rng.normal(0, 1.5, img.shape)  # sensor noise
    shape = F.interpolate(torch.from_numpy(rng.normal(size=(1, 1, 3, 6)).astype(np.float32)), size=(10, 20),
                          mode="bicubic", align_corners=False)[0, 0].numpy() > 0
    boat = textured(rng)[0, :10, :20] // 3
    img[10:20, 6:26][shape] = boat[shape]
    return np.clip(img, 0, 255).astype(np.uint8)


def shifted(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    pad = np.pad(img, ((4, 4), (4, 4), (0, 0)), mode="edge")
    return pad[4 + dy:36 + dy, 4 + dx:36 + dx].copy()


def cropped(img: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img[top:top + side, left:left + side]).resize((32, 32), Image.BICUBIC))


def recoloured(img: np.ndarray) -> np.ndarray:
    mix = np.array([[0.8, 0.2, 0.0], [0.1, 0.7, 0.2], [0.0, 0.3, 0.9]], np.float32)  # a change of hue
    return np.clip(0.8 * (img.astype(np.float32) @ mix.T) + 25, 0, 255).astype(np.uint8)


def features(n: int, seed: int) -> np.ndarray:
    """Stand-ins for the network's features: random, so that only the pixels can find the copies."""
    return np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32)


def test_edited_copies_match_their_original_above_the_threshold():
    rng = np.random.default_rng(0)
    base = textured(rng, 6)
    original = base[2]
    copies = {"shift": shifted(original, 3, -2), "crop": cropped(original, 2, 4, 25), "flip": original[:, ::-1],
              "recolour": recoloured(original), "all": recoloured(cropped(original[:, ::-1], 4, 1, 26))}
    queries = np.stack(list(copies.values()))
    near, score = duplicates.match(queries, base, features(len(queries), 1), features(len(base), 2))
    for name, i, s in zip(copies, near, score):
        assert i == 2 and s >= duplicates.THRESHOLD, (name, i, s)
    # and a different textured image is no copy
    _, score = duplicates.match(textured(np.random.default_rng(9)), base, features(1, 3), features(len(base), 2))
    assert score[0] < duplicates.THRESHOLD


def test_different_objects_on_the_same_background_score_below_the_threshold():
    rng = np.random.default_rng(1)
    one, others = seascape(rng), np.stack([seascape(rng) for _ in range(4)])
    near, score = duplicates.match(one[None], others, features(1, 0), features(4, 1))
    assert score[0] < duplicates.THRESHOLD
    # while the same seascape, moved and re-lit, is found
    _, score = duplicates.match(shifted(one, 2, 3)[None], one[None], features(1, 0), features(1, 1))
    assert score[0] >= duplicates.THRESHOLD


def test_within_never_matches_an_image_to_itself():
    images = textured(np.random.default_rng(2), 5)
    images[4] = images[1]  # an exact copy inside the set
    near, score = duplicates.match(images, images, features(5, 0), features(5, 0), within=True)
    assert (near != np.arange(5)).all()
    assert near[1] == 4 and near[4] == 1 and score[1] >= duplicates.THRESHOLD
    assert (score[[0, 2, 3]] < duplicates.THRESHOLD).all()


def test_shapes_dtypes_and_progress():
    rng = np.random.default_rng(3)
    queries, base = textured(rng, 3), textured(rng, 4)
    calls = []
    near, score = duplicates.match(queries, base, features(3, 0), features(4, 1), report=lambda d, t: calls.append(
        (d, t)))
    assert near.shape == (3,) and near.dtype == np.int64 and score.shape == (3,) and score.dtype == np.float32
    assert ((near >= 0) & (near < 4)).all() and ((score >= -1) & (score <= 1 + 1e-5)).all()
    assert calls and calls[-1][0] == calls[-1][1]
    near, score = duplicates.match(queries[:0], base, features(0, 0), features(4, 1))
    assert near.shape == (0,) and score.shape == (0,) and score.dtype == np.float32


@pytest.mark.parametrize("within", [False, True])
def test_one_image_against_one(within):
    image = textured(np.random.default_rng(4))
    near, score = duplicates.match(image, image, features(1, 0), features(1, 0), within=within)
    assert near.shape == (1,) and near[0] == (-1 if within else 0)
    assert score[0] == -1.0 if within else score[0] > 0.99
