"""Muon (conv filters) + SGD (the rest) in one optimizer, and how the LightningModule groups parameters for it."""

import pytest
import torch

from cifarlab.errors import ConfigError
from cifarlab.module import ImageClassifier
from cifarlab.optim import Muon, orthogonalize


@pytest.mark.parametrize("shape", [(8, 32), (32, 8), (16, 16)])
def test_orthogonalize_squeezes_singular_values_toward_one(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape) * torch.logspace(-1, 0, shape[1])  # column scales 0.1 .. 1
    s = torch.linalg.svdvals(orthogonalize(g, steps=5))
    assert s.min() > 0.3 and s.max() < 1.3  # Muon's quintic lands in roughly [0.5, 1.5], not exactly 1
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 3  # ... from a spread-out input


def test_sgd_groups_step_exactly_as_torch_sgd():
    torch.manual_seed(0)
    w1, w2 = torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    ref1, ref2 = (w.detach().clone().requires_grad_() for w in (w1, w2))
    ours = Muon([{"params": [w1], "weight_decay": 0.1}, {"params": [w2], "lr": 0.3}], lr=0.05, momentum=0.85,
                nesterov=True)
    theirs = torch.optim.SGD([{"params": [ref1], "weight_decay": 0.1}, {"params": [ref2], "lr": 0.3}], lr=0.05,
                             momentum=0.85, nesterov=True)
    for step in range(4):
        x = torch.randn(3)
        for opt, (a, b) in ((ours, (w1, w2)), (theirs, (ref1, ref2))):
            opt.zero_grad()
            ((a @ x).pow(2).sum() + (b * step).sin().sum()).backward()
            opt.step()
    torch.testing.assert_close(w1, ref1)
    torch.testing.assert_close(w2, ref2)


def test_muon_step_keeps_filter_norm_and_moves_by_lr():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 8, 3, 3) * 5)
    opt = Muon([{"params": [w], "muon": True, "lr": 0.1, "momentum": 0.0}], nesterov=False)
    w.grad = torch.randn_like(w)
    opt.step()
    before = w.detach().clone()
    w.grad = torch.randn_like(w)
    opt.step()
    # Each step first rescales the filter to norm sqrt(C_out), then adds lr x a matrix with singular values ~1.
    step = (w.detach() - before * (16**0.5 / before.norm())).reshape(16, -1)
    s = torch.linalg.svdvals(step) / 0.1
    assert s.min() > 0.3 and s.max() < 1.6
    assert abs(before.norm() - 16**0.5) < 0.1 * 16**0.5 + 0.1 * 4  # the first step had rescaled it too


def test_muon_recipe_puts_conv_filters_in_the_muon_group():
    model = ImageClassifier(arch="airbench", schedule={"cycle_momentum": False},
                            optimizer={"name": "muon", "lr": 1.5, "muon_lr": 0.24, "muon_momentum": 0.6,
                                       "weight_decay": 0.002, "bn_lr_scale": 64.0})
    muon, other, bn = model.param_groups()
    filters = [m.weight for m in model.net.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad]
    assert muon["muon"] and muon["lr"] == 0.24 and muon["momentum"] == 0.6
    assert {id(p) for p in muon["params"]} == {id(p) for p in filters} and len(filters) == 6
    assert {id(p) for p in other["params"]} == {id(model.net.whiten.bias), id(model.net.fc.weight)}
    assert "muon" not in other and bn["lr"] == 96.0


def test_muon_with_cycled_momentum_is_refused():
    with pytest.raises(ConfigError, match="cycle_momentum"):
        ImageClassifier(arch="airbench", optimizer={"name": "muon"}, schedule={"cycle_momentum": True})


def test_whitening_bias_learns_with_the_bn_biases_and_its_lr_decays_to_zero(image_folder):
    """airbench94_muon: the whitening bias at the BN biases' LR, falling linearly to 0 over its epochs, then frozen."""
    import lightning as L

    from cifarlab.data import CIFARDataModule

    dm = CIFARDataModule(root=str(image_folder), batch_size=24, eval_batch_size=16, val_size=0)  # 72 images: 3 steps
    model = ImageClassifier(
        arch="airbench", widths=[8, 16, 16], optimizer={"name": "muon", "lr": 0.5, "bn_lr_scale": 64.0},
        class_names=dm.class_names,
        whitening={"bias_lr_scale": 64.0, "bias_decay": True, "bias_epochs": 2},
        schedule={"cycle_momentum": False, "pct_start": 0.0, "div_factor": 1.0, "final_div_factor": 10.0})

    class Record(L.Callback):
        rows: list = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            groups = optimizer.param_groups
            whiten = next(g for g in groups if g.get("whiten_bias"))
            bn = groups[-1]
            self.rows.append((trainer.global_step, whiten["lr"], bn["lr"], pl_module.net.whiten.bias.detach().clone()))

    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, callbacks=[Record()], enable_model_summary=False)
    trainer.fit(model, dm)
    rows = Record.rows
    assert [r[0] for r in rows] == list(range(9))
    for step, whiten_lr, bn_lr, _ in rows[:6]:
        assert whiten_lr == pytest.approx(bn_lr * (1 - step / 6))  # same peak as the BN biases, 0 at step 6
    assert 0 < rows[5][1] < rows[1][1] < rows[0][1] == pytest.approx(rows[0][2])
    assert torch.equal(rows[6][3], rows[8][3]) and torch.equal(rows[8][3], model.net.whiten.bias.detach())  # frozen
    assert not torch.equal(rows[0][3], rows[5][3])  # ... after it had trained
    whiten = next(g for g in model.param_groups() if g.get("whiten_bias"))
    assert whiten["params"] == [model.net.whiten.bias] and whiten["weight_decay"] == pytest.approx(1e-4 / 64)


def test_whitening_bias_stays_with_the_head_by_default():
    groups = ImageClassifier(arch="airbench", optimizer={"name": "sgd"}).param_groups()
    assert len(groups) == 2 and not any(g.get("whiten_bias") for g in groups)  # older checkpoints' layout


def test_whitening_bias_freezes_mid_epoch_once_its_lr_is_zero(image_folder):
    """hiverge's 0.19 epochs: the bias stops needing a gradient (and the backward pass its work) the step its LR
    reaches 0, not at the next epoch."""
    import lightning as L

    from cifarlab.data import CIFARDataModule

    dm = CIFARDataModule(root=str(image_folder), batch_size=12, eval_batch_size=16, val_size=0)  # 72 images: 6 steps
    model = ImageClassifier(
        arch="airbench", widths=[8, 16, 16], optimizer={"name": "muon", "lr": 0.5, "bn_lr_scale": 64.0},
        class_names=dm.class_names,
        whitening={"bias_lr_scale": 64.0, "bias_decay": True, "bias_epochs": 0.5},  # 3 steps of LR > 0
        schedule={"cycle_momentum": False, "pct_start": 0.0, "div_factor": 1.0, "final_div_factor": 10.0})

    class Record(L.Callback):
        rows: list = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            bias = pl_module.net.whiten.bias
            self.rows.append((trainer.global_step, bias.requires_grad, bias.grad is not None))

    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, callbacks=[Record()], enable_model_summary=False)
    trainer.fit(model, dm)
    assert [r[0] for r in Record.rows] == list(range(12))
    assert [r[1] for r in Record.rows] == [True] * 3 + [False] * 9
    assert [r[2] for r in Record.rows] == [True] * 3 + [False] * 9  # no gradient computed once frozen
