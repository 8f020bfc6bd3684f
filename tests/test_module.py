"""Pieces of the LightningModule and callbacks that recipes switch on: BN learning rates, TTA, Lookahead."""

import pytest
import torch

from cifarlab.callbacks import Lookahead
from cifarlab.errors import ConfigError
from cifarlab.module import ImageClassifier
from cifarlab.settings import OptimizerConfig, TTAConfig


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


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize(("three_phase", "anneal", "pct"), [(False, "linear", 0.0), (False, "cos", 5 / 24),
                                                             (True, "linear", 0.25), (True, "cos", 0.3)])
def test_onecycle_matches_torchs_step_by_step(opt_cls, three_phase, anneal, pct):
    from cifarlab.optim import OneCycle

    def trace(cls):
        params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
        kw = {"momentum": 0.9} if opt_cls is torch.optim.SGD else {}
        opt = opt_cls([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 3.0}], **kw)
        sched = cls(opt, max_lr=[1.0, 3.0], total_steps=37, pct_start=pct, anneal_strategy=anneal,
                    three_phase=three_phase, div_factor=10, final_div_factor=100)
        out = []
        for _ in range(37):
            g = opt.param_groups[1]
            out += [g["lr"], g.get("momentum", g.get("betas", (0.0,))[0])]
            opt.step()
            sched.step()
        return out[:72]  # (torch's own schedule extrapolates past its last step)

    assert trace(OneCycle) == pytest.approx(trace(torch.optim.lr_scheduler.OneCycleLR))


def test_onecycle_length_changes_mid_run_keep_each_phases_share():
    from cifarlab.optim import OneCycle

    def lrs(total, resize_at=None, new_total=None):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = OneCycle(opt, max_lr=[1.0], total_steps=total, pct_start=0.25, anneal_strategy="linear",
                         cycle_momentum=False)
        out = []
        for step in range(new_total or total):
            if step == resize_at:
                sched.total_steps = new_total
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    grown, plain = lrs(100, resize_at=10, new_total=200), lrs(200)
    assert max(grown) == pytest.approx(1.0) and grown.index(max(grown)) == plain.index(max(plain))  # peak at 25%
    assert grown[-1] == pytest.approx(plain[-1]) and grown[150] == pytest.approx(plain[150])


def test_schedule_length_must_be_positive():
    with pytest.raises(ConfigError, match="schedule.total_steps"):
        ImageClassifier(schedule={"total_steps": 0})
