"""Pieces of the LightningModule and callbacks that recipes switch on: BN learning rates, TTA, Lookahead."""

import pytest
import torch

from cifarlab.callbacks import Lookahead
from cifarlab.errors import ConfigError
from cifarlab.module import ImageClassifier, OptimizerConfig, TTAConfig


def test_bn_parameters_get_scaled_lr_and_inverse_decay():
    model = ImageClassifier(arch="airbench", optimizer=OptimizerConfig(lr=2.0, weight_decay=0.01, bn_lr_scale=64.0))
    groups = model.param_groups()
    assert len(groups) == 2
    other, bn = groups
    assert bn["lr"] == 128.0 and bn["weight_decay"] == 0.01 / 64
    assert bn["lr"] * bn["weight_decay"] == other["lr"] * other["weight_decay"]
    bn_ids = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {id(p) for p in bn["params"]} == bn_ids  # frozen BN scales are not optimised
    assert all(p.requires_grad for g in groups for p in g["params"])


def test_tta_levels_average_views():
    torch.manual_seed(0)
    model = ImageClassifier(channels_last=False).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        plain = model(x)
        model.hparams.tta = {"level": 0}
        torch.testing.assert_close(model.tta_logits(x), plain)
        model.hparams.tta = {"level": 1}
        torch.testing.assert_close(model.tta_logits(x), 0.5 * (plain + model(x.flip(-1))))
        model.hparams.tta = {"level": 2}
        assert model.tta_logits(x).shape == (2, 10)


def test_selective_tta_views_only_unsure_images_and_decides_per_image():
    torch.manual_seed(0)
    model = ImageClassifier(arch="airbench", channels_last=False).eval()
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        plain = model(x)
        model.hparams.tta = {"level": 2}
        full = model.tta_logits(x)
        conf = plain.softmax(1).amax(1)
        threshold = conf.median().item()  # about half the images are unsure
        unsure = conf < threshold
        assert 0 < unsure.sum() < len(x)
        model.hparams.tta = {"level": 2, "confident_at": threshold}
        mixed = model.tta_logits(x)
        torch.testing.assert_close(mixed[unsure], full[unsure])
        torch.testing.assert_close(mixed[~unsure], plain[~unsure])
        # An image's logits do not depend on its batch mates.
        torch.testing.assert_close(model.tta_logits(x[:3]), mixed[:3])


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_selective_tta_threshold_must_be_a_probability(bad):
    with pytest.raises(ConfigError, match="confident_at"):
        ImageClassifier(tta=TTAConfig(level=2, confident_at=bad))


class _FakeTrainer:
    def __init__(self, total):
        self.global_step, self.estimated_stepping_batches = 0, total


def test_lookahead_pulls_toward_slow_weights_and_ends_on_them():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    la = Lookahead(every=1, decay_max=0.5, power=0.0)  # constant decay 0.5: easy to check
    trainer = _FakeTrainer(total=3)
    la.on_train_start(trainer, model)
    with torch.no_grad():
        model.weight.fill_(1.0)  # the optimizer moved the fast weights
    trainer.global_step = 1
    la.on_train_batch_end(trainer, model, None, None, 0)
    torch.testing.assert_close(model.weight, torch.full((1, 2), 0.5))  # slow = 0.5, fast reset to it
    with torch.no_grad():
        model.weight.fill_(3.0)
    trainer.global_step = 3  # the last step: the model takes the slow weights, which do not move
    la.on_train_batch_end(trainer, model, None, None, 0)
    torch.testing.assert_close(model.weight, torch.full((1, 2), 0.5))
