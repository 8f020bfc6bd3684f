"""Grad-CAM on the custom ResNet: parametrized over layers and methods; hooks are released (on a narrow network)."""

import gc
import tracemalloc

import numpy as np
import pytest
import torch

from cifarlab import cam as cams
from cifarlab.module import ImageClassifier


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ImageClassifier(num_classes=10, channels_last=False).eval()
    return m


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)


def test_target_layers_are_named_by_resolution_deepest_first(model):
    names = list(cams.target_layers(model.net))
    assert names[0] == "layer3 (4x4)"
    assert "layer2 (8x8)" in names and "layer1 (16x16)" in names and names[-1] == "prep (32x32)"


@pytest.mark.parametrize("method", list(cams.CAM_METHODS))
@pytest.mark.parametrize("layer", ["layer3 (4x4)", "layer2 (8x8)", "layer1 (16x16)"])
def test_cams_have_input_size_and_unit_range(model, images, layer, method):
    maps = cams.compute_cams(model, images, cams.target_layers(model.net)[layer], method)
    assert maps.shape == (3, 32, 32) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6


def test_cam_targets_the_requested_class(model, images):
    layer = cams.target_layers(model.net)["layer2 (8x8)"]
    a = cams.compute_cams(model, images[:1], layer, "Grad-CAM", [0])
    b = cams.compute_cams(model, images[:1], layer, "Grad-CAM", [1])
    assert not np.allclose(a, b)


def test_cam_works_inside_no_grad(model, images):
    layer = cams.target_layers(model.net)["layer3 (4x4)"]
    with torch.no_grad():  # grad-cam needs autograd: compute_cams turns it back on
        maps = cams.compute_cams(model, images, layer)
    assert maps.shape == (3, 32, 32)


def _hook_count(net):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(getattr(m, "_forward_pre_hooks", {}))
               for m in net.modules())


def test_hooks_are_released_and_memory_does_not_grow(images):
    # A narrow network: hooks and the Python objects around them are what could leak, whatever the widths (the custom
    # ResNet takes ~0.25 s a CAM on 2 cores, this one milliseconds).
    torch.manual_seed(0)
    model = ImageClassifier(arch="airbench", widths=[8, 16, 16], num_classes=10, channels_last=False).eval()
    layer = cams.target_layers(model.net)["block2 (7x7)"]
    before = _hook_count(model.net)
    for _ in range(5):  # warm-up: allocator pools and caches settle
        cams.compute_cams(model, images[:1], layer)
    gc.collect()
    tracemalloc.start()
    start, _ = tracemalloc.get_traced_memory()
    for _ in range(100):
        assert _hook_count(model.net) == before
        cams.compute_cams(model, images[:1], layer)
    gc.collect()
    end, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert _hook_count(model.net) == before
    assert end - start < 2_000_000, f"python memory grew by {end - start} bytes over 100 CAMs"


def test_overlay_and_heatmap_shapes():
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    cam = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    assert cams.overlay(img, cam, 0.5, 96).shape == (96, 96, 3)
    assert cams.heatmap(cam, 64).shape == (64, 64, 3)


def test_faithfulness_returns_a_drop_per_image(model, images):
    layer = cams.target_layers(model.net)["layer3 (4x4)"]
    preds = model(images).argmax(1).tolist()
    maps = cams.compute_cams(model, images, layer, "Grad-CAM", preds)
    cam_drop, random_drop = cams.faithfulness(model, images, maps, preds)
    assert cam_drop.shape == (3,) and random_drop.shape == (3,)
    assert np.isfinite(cam_drop).all() and np.isfinite(random_drop).all()
    assert (np.abs(cam_drop) <= 1).all()


def test_airbench_target_layers_are_its_blocks():
    from cifarlab.models import AirbenchNet

    assert list(cams.target_layers(AirbenchNet())) == ["block3 (3x3)", "block2 (7x7)", "block1 (15x15)"]
