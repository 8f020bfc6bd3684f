"""Selective backprop: which images a step keeps, that off changes nothing, BatchNorm's statistics, the flags."""

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import NARROW

from cifarlab.cli import main
from cifarlab.errors import ConfigError
from cifarlab.module import ImageClassifier
from cifarlab.selective import SelectiveBackpropConfig, evaluating, kept_count, losses_of, select_by_loss

BN = torch.nn.BatchNorm2d
REPO = Path(__file__).resolve().parents[1]
# training_step called without a Trainer: its self.log calls warn and do nothing
pytestmark = pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")


def _tiny(**selective) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(arch="airbench", widths=[8, 16, 16], channels_last=False, bn_momentum=0.5,
                           label_smoothing=0.1, schedule={"total_steps": 10},
                           selective_backprop=SelectiveBackpropConfig(**selective) if selective else None)


def _batch(n: int = 12):
    gen = torch.Generator().manual_seed(1)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
            torch.randint(0, 10, (n,), generator=gen))


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_selection_keeps_exactly_the_highest_losses_in_batch_order():
    logits = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10) % 5
    x = torch.arange(10).float().view(10, 1, 1, 1).expand(10, 3, 4, 4)  # image i is filled with i
    by_index = lambda images: logits[images[:, 0, 0, 0].long()]  # noqa: E731
    losses = F.cross_entropy(logits, y, reduction="none", label_smoothing=0.2)
    x_kept, y_kept = select_by_loss(by_index, x, y, 0.3, label_smoothing=0.2)
    top = losses.argsort(descending=True)[:3].sort().values
    assert torch.equal(x_kept[:, 0, 0, 0].long(), top) and torch.equal(y_kept, y[top])
    assert losses[top].min() > losses[[i for i in range(10) if i not in top]].max()
    assert [kept_count(n, k) for n, k in [(1536, 0.5), (10, 0.3), (3, 0.01), (4, 1.0)]] == [768, 3, 1, 4]


def test_the_scoring_pass_can_see_smaller_images():
    seen = []
    losses = losses_of(lambda v: seen.append(v.shape) or torch.zeros(len(v), 10), *_batch(4), scale_factor=0.5)
    assert seen == [(4, 3, 16, 16)] and losses.shape == (4,) and not losses.requires_grad


def test_window_and_interrupt_pick_the_steps():
    config = SelectiveBackpropConfig(keep=0.5, start=0.5, end=0.9, interrupt=2)
    chosen = [s for s in range(100) if config.selects(s, 100)]
    assert chosen == list(range(50, 90, 2))  # every other step of the window, as Composer's interrupt=2
    assert sum(SelectiveBackpropConfig(keep=0.5, start=0.0, end=1.0, interrupt=0).selects(s, 7) for s in range(7)) == 7
    assert not any(SelectiveBackpropConfig(start=0.0, end=1.0, interrupt=0).selects(s, 7) for s in range(7))  # keep 1


@pytest.mark.parametrize("field, bad", [("keep", 0.0), ("keep", 1.5), ("start", -0.1), ("end", 1.2),
                                        ("interrupt", -1), ("scale_factor", 0.0)])
def test_out_of_range_settings_are_config_errors(field, bad):
    with pytest.raises(ConfigError, match=f"selective_backprop.{field}"):
        ImageClassifier(selective_backprop={field: bad})


@pytest.mark.parametrize("selective", [{}, {"keep": 1.0, "start": 0.0, "interrupt": 0},
                                       {"keep": 0.5, "start": 0.5}])  # off; keep 1; before the window
def test_off_is_the_plain_step_loss_and_gradients(selective):
    batch = _batch()
    plain, model = _tiny(), _tiny(**selective)
    plain.train(), model.train()
    _, _, expected = plain.logits_and_loss(batch)
    expected.backward()
    loss = model.training_step(batch, 0)
    loss.backward()
    assert torch.equal(loss, expected)
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), name
    assert all(torch.equal(v, _bn_state(plain)[k]) for k, v in _bn_state(model).items())


def test_a_selective_step_trains_on_the_kept_images_and_updates_bn_once():
    x, y = batch = _batch()
    model = _tiny(keep=0.5, start=0.0, interrupt=0)
    model.train()
    # Independently: the 6 highest losses under the eval-mode network, then one training forward on them.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        losses = F.cross_entropy(reference.eval()(x), y, reduction="none", label_smoothing=0.1)
    kept = losses.topk(6).indices.sort().values
    reference.train()
    _, _, expected = reference.logits_and_loss((x[kept], y[kept]))
    expected.backward()
    before = _bn_state(model)

    loss = model.training_step(batch, 0)
    loss.backward()
    torch.testing.assert_close(loss, expected)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    after, once = _bn_state(model), _bn_state(reference)
    for key in after:  # running statistics moved once, from the kept images: the reference's single update
        torch.testing.assert_close(after[key], once[key], msg=key)
        if key.endswith("num_batches_tracked"):
            assert after[key] == before[key] + 1
    assert any(not torch.equal(after[k], before[k]) for k in after if k.endswith("running_mean"))
    assert all(m.training for m in model.modules())  # the scoring pass's eval mode is undone


def test_evaluating_restores_each_submodules_own_mode():
    model = _tiny()
    model.train()
    frozen = next(m for m in model.modules() if isinstance(m, BN))
    frozen.eval()
    with evaluating(model):
        assert not any(m.training for m in model.modules())
    assert not frozen.training and model.training and sum(not m.training for m in model.modules()) == 1


def test_flags_parse_from_the_command_line(capsys):
    import yaml

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "smoke", "--model.selective_backprop.keep", "0.5",
              "--model.selective_backprop.interrupt", "0", "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["selective_backprop"]
    assert printed == {"keep": 0.5, "start": 0.5, "end": 0.9, "interrupt": 0, "scale_factor": 1.0}


def test_a_fit_logs_the_kept_share_and_records_the_setting(image_folder, tmp_path):
    # 24 x 3 training images, batch 16 -> 4 steps; selection from step 1 (start 0.25) on every step.
    main(["fit", "--config", "smoke", "--data.root", str(image_folder), "--run.dir", str(tmp_path), *NARROW,
          "--trainer.limit_val_batches", "1", "--trainer.precision", "32-true",
          "--model.selective_backprop.keep", "0.5", "--model.selective_backprop.start", "0.25",
          "--model.selective_backprop.end", "1.0", "--model.selective_backprop.interrupt", "0"])
    run = sorted((tmp_path / "smoke").glob("version_*"))[-1]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    kept = [float(r["train_kept_step"]) for r in rows if r.get("train_kept_step")]
    assert kept[0] == 1.0 and set(kept[1:]) == {0.5}
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["selective_backprop"]["keep"] == 0.5
    assert json.loads((run / "test_metrics.json").read_text())["num_images"] == 18


@pytest.mark.slow
def test_the_step_cost_benchmark_runs(image_folder):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "selective.py"), "--data.root", str(image_folder),
                           "--batch_size", "16", "--repeats", "1", "--scale_factor", "1", "0.5"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| plain step |" in proc.stdout and proc.stdout.count("| selective step, keep 0.5") == 2
