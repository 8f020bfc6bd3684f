"""Class activation maps with pytorch-grad-cam: target layers, CAMs, overlays and a faithfulness score.

CAMs run on the plain network (``model.net``) with the normalised input, in float32 with gradients on:
grad-cam needs autograd, so this must never run under ``torch.no_grad()``. Each call opens the CAM as a
context manager, so its hooks are released after every request (pytorch-grad-cam's recommended use).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

# The methods offered, by name -> pytorch-grad-cam's class. grad-cam is imported at the first CAM: with torchvision
# and scikit-learn it is seconds of start-up that a page or a command without CAMs need not wait for.
CAM_METHODS = {"Grad-CAM": "GradCAM", "Grad-CAM++": "GradCAMPlusPlus", "XGrad-CAM": "XGradCAM", "LayerCAM": "LayerCAM"}


def load_library() -> None:
    """Import pytorch-grad-cam now (the app does it behind its page, so the first CAM does not wait seconds for it)."""
    import pytorch_grad_cam  # noqa: F401  (an optional extra, seconds to import: on demand)
    import pytorch_grad_cam.metrics.road  # noqa: F401  (the faithfulness score's part of it)


PLAIN_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.GELU, nn.MaxPool2d, nn.Linear, nn.Flatten)


def target_layers(net: nn.Module, image_size: int = 32) -> dict[str, nn.Module]:
    """Named candidate layers, deepest first, labelled with their output resolution, e.g. ``layer3 (4x4)``.

    Candidates: the network's top-level blocks, and the inner blocks of a top-level ``Sequential`` except its
    last (whose output is the block's own), that output a feature map larger than 1x1; single layers (a conv,
    an activation) are left out.
    """
    candidates: dict[str, nn.Module] = {}
    for name, child in net.named_children():
        if not isinstance(child, PLAIN_LAYERS):
            candidates[name] = child
        if isinstance(child, nn.Sequential):
            for sub, inner in list(child.named_children())[:-1]:
                if not isinstance(inner, PLAIN_LAYERS):
                    candidates[f"{name}.{sub}"] = inner
    shapes: dict[str, tuple] = {}

    def record(name):
        def hook(_module, _inputs, output):  # returns None: the output is left as it is
            shapes.setdefault(name, tuple(output.shape))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in candidates.items()]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, 3, image_size, image_size, device=next(net.parameters()).device))
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    finished = list(shapes)  # the order in which the blocks finished: later = deeper
    maps = [n for n in finished if len(shapes[n]) == 4 and shapes[n][-1] > 1]
    maps.sort(key=lambda n: (shapes[n][-1], -finished.index(n)))  # coarsest, then deepest, first
    return {f"{n} ({shapes[n][-2]}x{shapes[n][-1]})": candidates[n] for n in maps}


def compute_cams(model, x: torch.Tensor, layer: nn.Module, method: str = "Grad-CAM",
                 classes: list[int] | None = None) -> np.ndarray:
    """CAMs ``(B, 32, 32)`` in [0, 1] for uint8 images ``x`` ``(B, 3, 32, 32)``, for ``classes`` (default: the
    predicted class of each image)."""
    import pytorch_grad_cam  # an optional extra, seconds to import: at the first CAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # with grad-cam

    cam_cls = getattr(pytorch_grad_cam, CAM_METHODS[method])
    net = model.net
    inputs = model.normalize(x.to(model.device)).float()
    targets = None if classes is None else [ClassifierOutputTarget(int(c)) for c in classes]
    with torch.enable_grad(), cam_cls(model=net, target_layers=[layer]) as cam:
        maps = cam(input_tensor=inputs, targets=targets)
    return np.nan_to_num(maps.astype(np.float32))


def overlay(image: np.ndarray, cam: np.ndarray, opacity: float = 0.5, size: int | None = None) -> np.ndarray:
    """Heat map of ``cam`` (H, W) over ``image`` (H, W, 3) uint8, optionally upscaled to ``size`` pixels."""
    if size:
        image = upscale(image, size, smooth=False)
        cam = np.asarray(torch.nn.functional.interpolate(torch.from_numpy(cam)[None, None], size=(size, size),
                                                         mode="bilinear", align_corners=False)[0, 0])
    from pytorch_grad_cam.utils.image import show_cam_on_image  # an optional extra, seconds to import: when used

    return show_cam_on_image(image.astype(np.float32) / 255, cam, use_rgb=True, image_weight=1 - opacity)


def heatmap(cam: np.ndarray, size: int) -> np.ndarray:
    """The CAM alone as a colour image, ``size`` pixels square."""
    return overlay(np.zeros((*cam.shape, 3), dtype=np.uint8), cam, opacity=1.0, size=size)


def upscale(image: np.ndarray, size: int, smooth: bool = False) -> np.ndarray:
    """``(h, w, 3)`` uint8 -> ``(size, size, 3)``; nearest neighbour keeps the 32x32 pixels visible."""
    resample = Image.Resampling.BICUBIC if smooth else Image.Resampling.NEAREST
    return np.asarray(Image.fromarray(image).resize((size, size), resample))


def faithfulness(model, x: torch.Tensor, cams: np.ndarray, classes: list[int], percentile: int = 80,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Confidence drop when the CAM's top ``100 - percentile``% pixels are removed, and when as many random
    pixels are removed (pytorch-grad-cam's ROAD: removed pixels are imputed from their neighbours).

    Returns ``(cam_drop, random_drop)``, each ``(B,)``: the predicted class's softmax probability before
    minus after. A faithful CAM drops confidence much more than random removal.
    """
    from pytorch_grad_cam.metrics.road import ROADMostRelevantFirst  # an optional extra, seconds to import: when used
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget  # with grad-cam

    net = model.net
    inputs = model.normalize(x.to(model.device)).float()
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    metric = ROADMostRelevantFirst(percentile=percentile)
    rng = np.random.default_rng(seed)
    random_maps = rng.random(cams.shape).astype(np.float32)
    was_training = net.training
    net.eval()
    try:
        cam_drop = -metric(inputs, cams, targets, net)
        random_drop = -metric(inputs, random_maps, targets, net)
    finally:
        net.train(was_training)
    return np.asarray(cam_drop, dtype=np.float32).ravel(), np.asarray(random_drop, dtype=np.float32).ravel()


def resolve_layer(layers: dict[str, nn.Module], name: str | None) -> tuple[str, nn.Module]:
    """``(label, layer)`` of the candidate called ``name`` (a ``target_layers`` label such as ``block3 (4x4)``, or the
    bare block name ``block3``), else the deepest one: two networks compared need not share layer names."""
    if name in layers:
        return name, layers[name]
    bare = {label.split(" (")[0]: label for label in layers}
    label = bare.get(str(name), next(iter(layers)))
    return label, layers[label]
