"""Plain ``nn.Module`` networks. Nothing here imports Lightning, so a model can be used on its own.

Every network maps a normalised float image batch ``(B, 3, 32, 32)`` to logits ``(B, num_classes)``.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    """3x3 conv (no bias: BatchNorm's shift makes it redundant) -> [max-pool 2] -> BN -> ReLU.

    Pooling before BN, as in "How to train your ResNet", runs BN and ReLU on 4x fewer pixels.
    """
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """``x + block(x)`` with ``block`` = two conv-BN-ReLU at constant width."""

    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class CustomResNet(nn.Module):
    """The ResNet-9 style "custom ResNet" (David Page's DAWNBench net): 6,573,120 parameters.

    Shapes for a 32x32 input:
      prep    (B, 64, 32, 32)
      layer1  (B, 128, 16, 16)  conv + pool, then a residual block
      layer2  (B, 256, 8, 8)    conv + pool
      layer3  (B, 512, 4, 4)    conv + pool, then a residual block
      head    (B, num_classes)  max-pool 4 -> flatten -> linear (no bias)

    Args:
        num_classes: number of output logits.
        logit_scale: multiplies the logits; Page's 94% recipe uses 0.125 so that the loss starts
            near log(10) and the effective LR of the last layer is tamed.
    """

    def __init__(self, num_classes: int = 10, logit_scale: float = 1.0):
        super().__init__()
        self.logit_scale = logit_scale
        self.prep = conv_bn(3, 64)
        self.layer1 = nn.Sequential(conv_bn(64, 128, pool=True), Residual(128))
        self.layer2 = conv_bn(128, 256, pool=True)
        self.layer3 = nn.Sequential(conv_bn(256, 512, pool=True), Residual(512))
        self.pool = nn.MaxPool2d(4)
        self.fc = nn.Linear(512, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))  # (B, 512, 4, 4)
        x = self.pool(x).flatten(1)  # (B, 512)
        return self.fc(x) * self.logit_scale


# Names accepted by ``--model.arch``; faster variants register here.
ARCHITECTURES: dict[str, type[nn.Module]] = {"custom_resnet": CustomResNet}


def build_model(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """Instantiate a network from ``ARCHITECTURES`` by name."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](num_classes=num_classes, **kwargs)
