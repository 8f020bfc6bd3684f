"""Plain ``nn.Module`` networks. Nothing here imports Lightning, so a model can be used on its own.

Every network maps a normalised float image batch ``(B, 3, 32, 32)`` to logits ``(B, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cifarlab.errors import ConfigError


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
      head    (B, num_classes)  global max-pool -> flatten -> linear (no bias)

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
        self.pool = nn.AdaptiveMaxPool2d(1)  # = MaxPool2d(4) at 32x32; any input size (progressive resizing)
        self.fc = nn.Linear(512, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))  # (B, 512, 4, 4)
        x = self.pool(x).flatten(1)  # (B, 512)
        return self.fc(x) * self.logit_scale


def frozen_scale_bn(channels: int, momentum: float) -> nn.BatchNorm2d:
    """BatchNorm whose scale stays 1 (the next conv can absorb any scale, so learning it only adds noise);
    ``momentum`` is airbench's: the weight kept of the running statistics (PyTorch's momentum is 1 - it)."""
    bn = nn.BatchNorm2d(channels, eps=1e-12, momentum=1 - momentum)
    bn.weight.requires_grad_(False)
    return bn


def dirac_conv(c_in: int, c_out: int) -> nn.Conv2d:
    """3x3 conv, no bias, whose first ``c_in`` filters start as identities (airbench: trains faster early)."""
    conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)
    nn.init.dirac_(conv.weight.data[:c_in])
    return conv


# Activations the airbench network's conv groups take (``activation``): airbench's GELU, or hiverge's SiLU.
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "silu": nn.SiLU}


class ConvGroup(nn.Module):
    """conv -> max-pool 2 -> BN -> act -> conv -> BN -> act (airbench94's block; act: GELU)."""

    def __init__(self, c_in: int, c_out: int, bn_momentum: float, activation: str = "gelu"):
        super().__init__()
        self.conv1 = dirac_conv(c_in, c_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = frozen_scale_bn(c_out, bn_momentum)
        self.conv2 = dirac_conv(c_out, c_out)
        self.norm2 = frozen_scale_bn(c_out, bn_momentum)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """airbench94's network (Keller Jordan): 2x2 patch-whitening conv, three conv groups, ~2.0M parameters,
    about 0.24 GFLOP per 32x32 image forward (the custom ResNet needs ~0.75).

    Shapes for a 32x32 input, default widths:
      whiten  (B, 24, 31, 31)   2x2 conv, no padding, frozen weights set by ``init_whitening``
      block1  (B, 64, 15, 15)
      block2  (B, 256, 7, 7)
      block3  (B, 256, 3, 3)
      head    (B, num_classes)  global max-pool -> flatten -> linear (no bias) * logit_scale

    Args:
        num_classes: number of output logits.
        logit_scale: multiplies the logits (airbench: 1/9).
        widths: channels of the three conv groups.
        bn_momentum: airbench's BatchNorm momentum (0.6: running stats follow the last few batches).
        activation: the conv groups' activation, ``gelu`` (airbench) or ``silu`` (hiverge's speedrun); the one after
            the whitening conv stays GELU, as in both.
    """

    def __init__(self, num_classes: int = 10, logit_scale: float = 1 / 9, widths: tuple[int, int, int] = (64, 256, 256),
                 bn_momentum: float = 0.6, activation: str = "gelu"):
        super().__init__()
        self.logit_scale = logit_scale
        kernel = 2
        whiten_width = 2 * 3 * kernel**2  # each eigenvector of the 2x2x3 patch covariance, with both signs
        self.whiten = nn.Conv2d(3, whiten_width, kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.act = nn.GELU()
        self.block1 = ConvGroup(whiten_width, widths[0], bn_momentum, activation)
        self.block2 = ConvGroup(widths[0], widths[1], bn_momentum, activation)
        self.block3 = ConvGroup(widths[1], widths[2], bn_momentum, activation)
        self.pool = nn.AdaptiveMaxPool2d(1)  # = airbench's MaxPool2d(3) at 32x32; any input size
        self.fc = nn.Linear(widths[2], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.act(self.whiten(x)))))  # (B, widths[2], 3, 3)
        return self.fc(self.pool(x).flatten(1)) * self.logit_scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalised training images ``(N, 3, 32, 32)``: the eigenvectors of
        the 2x2 patch covariance, scaled by 1/sqrt(eigenvalue + eps), with both signs."""
        kh, kw = self.whiten.kernel_size
        patches = images.float().unfold(2, kh, 1).unfold(3, kw, 1).transpose(1, 3).reshape(-1, 3, kh, kw)
        flat = patches.reshape(len(patches), -1)  # (N * 31 * 31, 12)
        covariance = flat.T @ flat / len(flat)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.flip(0).view(-1, 1, 1, 1)
        eigenvectors = eigenvectors.T.reshape(-1, 3, kh, kw).flip(0)
        scaled = eigenvectors / torch.sqrt(eigenvalues + eps)
        self.whiten.weight.copy_(torch.cat((scaled, -scaled)).to(self.whiten.weight))


# Names accepted by ``--model.arch``.
ARCHITECTURES: dict[str, type[nn.Module]] = {"custom_resnet": CustomResNet, "airbench": AirbenchNet}


def build_model(arch: str, num_classes: int, widths: Sequence[int] | None = None, activation: str | None = None,
                bn_momentum: float | None = None, **kwargs) -> nn.Module:
    """Instantiate a network from ``ARCHITECTURES`` by name; ``widths``, ``activation`` and ``bn_momentum`` (airbench
    only; ``None``: the network's default) override its channels, conv-group activation and BatchNorm momentum."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}: choose one of {sorted(ARCHITECTURES)}")
    fixed = {"widths": (widths, "fixed widths"), "activation": (activation, "a fixed activation"),
             "bn_momentum": (bn_momentum, "a fixed bn_momentum")}
    for flag, (value, what) in fixed.items():
        if value is not None and arch != "airbench":
            raise ConfigError(f"architecture {arch!r} has {what}: leave --model.{flag} out, or use arch airbench")
    if activation is not None:
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}: choose one of {sorted(ACTIVATIONS)}")
        kwargs["activation"] = activation
    if bn_momentum is not None:
        if not 0 <= bn_momentum < 1:
            raise ConfigError(f"--model.bn_momentum is the share of the running BatchNorm statistics kept each step "
                              f"(airbench: 0.6): in [0, 1), got {bn_momentum}")
        kwargs["bn_momentum"] = bn_momentum
    if widths is not None:
        if len(widths) != 3 or min(widths) < 1:
            raise ConfigError(f"--model.widths takes 3 positive channel counts (one per conv group), "
                              f"got {list(widths)}")
        kwargs["widths"] = tuple(widths)
    return ARCHITECTURES[arch](num_classes=num_classes, **kwargs)
