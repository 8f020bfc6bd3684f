import pytest
import torch

from cifarlab.errors import ConfigError
from cifarlab.models import CustomResNet, Residual, build_model


def test_custom_resnet_has_the_published_parameter_count():
    assert sum(p.numel() for p in CustomResNet().parameters()) == 6_573_120


@pytest.mark.parametrize("num_classes", [10, 3])
def test_output_shape(num_classes):
    net = CustomResNet(num_classes=num_classes).eval()
    assert net(torch.randn(5, 3, 32, 32)).shape == (5, num_classes)


@pytest.mark.parametrize("arch", ["custom_resnet", "airbench"])
@pytest.mark.parametrize("size", [16, 24, 32])
def test_networks_take_smaller_crops(arch, size):
    """Progressive resizing trains on crops down to MIN_CROP: the head pools whatever map is left."""
    from cifarlab.transforms import MIN_CROP

    assert size >= MIN_CROP
    net = build_model(arch, 10).eval()
    assert net(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_residual_adds_its_input():
    torch.manual_seed(0)
    res = Residual(8).eval()
    x = torch.randn(2, 8, 4, 4)
    expected = x + res.block(x)
    torch.testing.assert_close(res(x), expected)
    # With the block silenced (last BN outputs 0 -> ReLU 0) only the skip path is left: output == input.
    bn = res.block[1][1]
    torch.nn.init.zeros_(bn.weight)
    torch.nn.init.zeros_(bn.bias)
    torch.testing.assert_close(res(x), x)


def test_logit_scale_multiplies_logits():
    torch.manual_seed(0)
    a = CustomResNet(logit_scale=1.0).eval()
    b = CustomResNet(logit_scale=0.125).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(b(x), a(x) * 0.125)


def test_build_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet1000", 10)


def test_airbench_widths_set_each_conv_group():
    net = build_model("airbench", 10, widths=(128, 384, 384))
    assert [block.conv2.out_channels for block in (net.block1, net.block2, net.block3)] == [128, 384, 384]
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch, widths, message", [
    ("custom_resnet", (64, 128, 256), "has fixed widths"),
    ("airbench", (64, 256), "3 positive channel counts"),
    ("airbench", (64, 0, 256), "3 positive channel counts"),
])
def test_bad_widths_are_a_config_error(arch, widths, message):
    with pytest.raises(ConfigError, match=message):
        build_model(arch, 10, widths=widths)


def test_models_module_does_not_import_lightning():
    import subprocess
    import sys

    code = "import sys, cifarlab.models; print('lightning' in sys.modules or 'pytorch_lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_airbench_net_shapes_frozen_parts_and_size():
    from cifarlab.models import AirbenchNet

    net = AirbenchNet().eval()
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert not net.whiten.weight.requires_grad and not net.block1.norm1.weight.requires_grad
    assert net.block1.norm1.bias.requires_grad
    assert 1.9e6 < sum(p.numel() for p in net.parameters()) < 2.1e6


def test_whitening_init_whitens_patches():
    from cifarlab.models import AirbenchNet

    torch.manual_seed(0)
    # Strongly correlated channels: whitening must decorrelate them.
    base = torch.randn(64, 1, 32, 32)
    images = torch.cat([base, base * 0.9 + 0.1 * torch.randn_like(base), base * 0.8], dim=1)
    net = AirbenchNet()
    net.init_whitening(images, eps=0.0)
    out = torch.nn.functional.conv2d(images, net.whiten.weight[:12])  # (N, 12, 31, 31), one sign
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = flat.T @ flat / len(flat)
    well_conditioned = cov[:8, :8]  # the smallest eigenvalues are near 0 here: leave them out
    torch.testing.assert_close(well_conditioned, torch.eye(8), atol=0.05, rtol=0)
