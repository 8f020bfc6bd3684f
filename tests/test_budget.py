"""--budget: the schedule is planned to fit the time, and bad budgets are one line."""

import math
import time

import pytest

from cifarlab.budget import Plan, Speed, TimeBudget, format_seconds, make_plan, parse_budget
from cifarlab.errors import ConfigError

FAST = "configs/fast.yaml"


@pytest.mark.parametrize(("text", "seconds"), [("10m", 600), ("90s", 90), ("1h30m", 5400), ("2.5m", 150),
                                               ("600", 600), ("1m30s", 90), ("10min", 600), (" 20 m ", 1200)])
def test_parse_budget(text, seconds):
    assert parse_budget(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "message"), [("0", "leaves no time"), ("0m", "leaves no time"),
                                               ("-5m", "negative"), ("abc", "not a duration"),
                                               ("10 minutes", "not a duration"), ("1h2", "not a duration"),
                                               ("", "not a duration")])
def test_bad_budgets(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_budget(text)


UNIT_SPEED = Speed(1.0, None, 0.5, 0.0)  # 1 s per training step, 0.5 s per evaluation batch


def _plan(budget, speed=UNIT_SPEED, **kw):
    now = 1000.0
    args = dict(steps_per_epoch=48, val_images=0, test_images=10000, eval_batch_size=1000, tta_level=2,
                crop_fraction=0.0, whole_epochs=False, batch_size=1024)
    args.update(kw)
    return make_plan(budget, now + budget, now, speed, **args), now


def test_plan_fits_the_budget_and_grows_with_it():
    small, now = _plan(300)
    large, _ = _plan(600)
    assert 0 < small.steps < large.steps
    for plan, budget in ((small, 300), (large, 600)):
        # test: 10 batches x 6 TTA passes x 0.5 s; training 1 s a step; within the budget, and close to it
        assert plan.expected_end <= now + budget
        assert plan.expected_end >= now + 0.9 * budget
        assert plan.epochs == math.ceil(plan.steps / 48)


def test_plan_counts_validation_and_tta():
    plain, _ = _plan(600)
    with_val, _ = _plan(600, val_images=5000)
    no_tta, _ = _plan(600, tta_level=0)
    assert with_val.steps < plain.steps < no_tta.steps


def test_plan_whole_epochs_and_crops():
    whole, _ = _plan(600, whole_epochs=True)
    assert whole.steps % 48 == 0
    cropped, _ = _plan(600, speed=Speed(1.0, 0.5, 0.5, 0.0), crop_fraction=0.5)
    plain, _ = _plan(600)
    assert cropped.steps > plain.steps and cropped.crop_epochs == round(0.5 * cropped.steps / 48)


def test_plan_too_short_for_one_step():
    with pytest.raises(ConfigError, match="too short to train one step"):
        _plan(20)  # the test alone takes 10 x 6 x 0.5 = 30 s


def test_format_seconds():
    assert format_seconds(612.3) == "10m 12s" and format_seconds(42) == "42s"


def test_resumed_run_keeps_its_saved_plan():
    class Loop:
        max_epochs = 15

        class epoch_loop:  # noqa: N801
            max_steps = -1

    class DM:
        class augment:  # noqa: N801
            early_crop, early_crop_epochs = 24, 9

    class FakeTrainer:
        fit_loop, datamodule = Loop, DM

    cb = TimeBudget(600, start=time.time(), resume=True)
    cb.setup(FakeTrainer, None, "fit")  # resuming: no probe
    assert cb.plan is None
    plan = Plan(600, 300, 7, 48, 3, 0.0, 1000.0, 12.0, 0.0, True)
    cb.load_state_dict({"plan": vars(plan)})
    assert (Loop.max_epochs, Loop.epoch_loop.max_steps, DM.augment.early_crop_epochs) == (7, 300, 3)
    assert cb.state_dict() == {"plan": vars(plan)}


def test_budgeted_fit_plans_the_whole_schedule(image_folder, tmp_path, capsys):
    from cifarlab.cli import main
    from cifarlab.module import ImageClassifier

    start = time.time()
    main(["fit", "--config", FAST, "--data.root", str(image_folder), "--run.dir", str(tmp_path), "--budget", "90s",
          "--data.batch_size", "8", "--data.eval_batch_size", "16", "--data.val_size", "0",
          "--trainer.enable_progress_bar", "false"])
    captured = capsys.readouterr()
    out = captured.out + captured.err
    line = next(x for x in out.splitlines() if x.startswith("cifarlab: budget 1m 30s"))
    steps = int(line.split(" steps of ")[0].rsplit(" ", 1)[1])
    assert steps >= 1 and "expected end" in line
    # Early in the run the plan is corrected once by the loop's own pace (tiny batches: Lightning's per-step
    # overhead, which the probe's bare steps leave out, dominates).
    replanned = [x for x in out.splitlines() if "re-planned the run to" in x]
    if replanned:
        steps = int(replanned[0].split("re-planned the run to ")[1].split(" ")[0])
    assert time.time() - start < 90 * 1.1 + 30  # (loose: a busy CI machine; benchmarks/budget.py measures it)
    run = tmp_path / "fast" / "version_0"
    assert (run / "test_metrics.json").exists()  # tested after training
    ckpt = ImageClassifier.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert ckpt is not None
    import torch

    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == steps  # the run trained exactly the planned steps ...
    sched = state["lr_schedulers"][0]
    assert sched["total_steps"] == steps and sched["last_epoch"] == steps  # ... over a schedule of that length
    budget_state = next(v for k, v in state["callbacks"].items() if k.startswith("TimeBudget"))
    assert budget_state["plan"]["steps"] == steps and budget_state["plan"]["replanned"]


@pytest.mark.parametrize(("budget", "message"), [(["--budget", "0"], "--budget 0 leaves no time"),
                                                 (["--budget=-5m"], "--budget -5m is negative"),
                                                 (["--budget", "-5m"], "--budget: expected one argument"),
                                                 (["--budget", "abc"], "--budget 'abc' is not a duration"),
                                                 (["--budget", "0.001s"], "is already spent")])
def test_bad_budget_is_one_line_and_exit_2(budget, message, image_folder, tmp_path, capsys):
    from cifarlab.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", FAST, "--data.root", str(image_folder), "--run.dir", str(tmp_path), *budget])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cifarlab: error: ") and message in err[0]
    assert not (tmp_path / "fast").exists()  # refused before any run folder


def test_budget_too_short_for_a_step_is_one_line(image_folder, tmp_path, capsys, monkeypatch):
    from cifarlab import budget
    from cifarlab.cli import main

    # The machine is "slow": one step takes 100 s, so a 60-s budget cannot hold one.
    monkeypatch.setattr(budget, "probe_speed", lambda *a, **k: Speed(100.0, None, 0.01, 0.0))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", FAST, "--data.root", str(image_folder), "--run.dir", str(tmp_path),
              "--budget", "60s", "--data.val_size", "0", "--data.batch_size", "8"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "too short to train one step" in err[0]


def test_budget_is_for_fit_only(image_folder, tmp_path, capsys):
    from cifarlab.cli import main

    with pytest.raises(SystemExit):
        main(["test", "--config", FAST, "--data.root", str(image_folder), "--run.dir", str(tmp_path),
              "--budget", "5m"])
    assert "it is for `cifarlab fit`" in capsys.readouterr().err


def _budget_fit(folder, run_dir, *extra):
    from cifarlab.cli import main

    main(["fit", "--config", FAST, "--data.root", str(folder), "--run.dir", str(run_dir), "--data.batch_size", "8",
          "--data.eval_batch_size", "16", "--data.val_size", "0", "--trainer.enable_progress_bar", "false", *extra])


def test_resume_keeps_the_budget_plan_and_a_plain_checkpoint_refuses_a_budget(image_folder, tmp_path, capsys):
    import torch

    from cifarlab.cli import main

    _budget_fit(image_folder, tmp_path, "--budget", "40s")
    last = tmp_path / "fast" / "version_0" / "checkpoints" / "last.ckpt"
    steps = torch.load(last, weights_only=True)["global_step"]
    # Resumed without --budget: the saved plan still sizes the loop (the run is complete: nothing more to train).
    _budget_fit(image_folder, tmp_path, "--ckpt_path", "last")
    assert "resuming the saved plan, " + f"{steps} steps" in capsys.readouterr().out
    assert torch.load(last, weights_only=True)["global_step"] == steps
    # A checkpoint trained without a budget cannot take one: its schedule has its own length.
    _budget_fit(image_folder, tmp_path / "plain", "--trainer.max_epochs", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", FAST, "--data.root", str(image_folder), "--run.dir", str(tmp_path / "plain"),
              "--data.val_size", "0", "--ckpt_path", "last", "--budget", "5m"])
    assert exit_info.value.code == 2 and "was trained without --budget" in capsys.readouterr().err


def test_budget_refuses_partial_batches(image_folder, tmp_path, capsys):
    from cifarlab.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", FAST, "--data.root", str(image_folder), "--run.dir", str(tmp_path),
              "--budget", "5m", "--trainer.accumulate_grad_batches", "2"])
    assert "leave --trainer.accumulate_grad_batches" in capsys.readouterr().err


def test_probe_restores_the_model_and_the_random_streams(image_folder):
    import lightning as L
    import torch

    from cifarlab.budget import probe_speed
    from cifarlab.data import CIFARDataModule
    from cifarlab.module import ImageClassifier

    dm = CIFARDataModule(root=str(image_folder), batch_size=8, eval_batch_size=16, val_size=0)
    dm.setup("fit")
    model = ImageClassifier(arch="airbench", optimizer={"name": "sgd", "lr": 0.1}, class_names=dm.classes)
    model.net.block1.eval()  # an odd mode, to see it kept
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    speed = probe_speed(trainer, model, dm)
    assert torch.equal(torch.rand(3), expected)  # the seeded stream did not move
    assert speed.step_s > 0 and speed.eval_batch_s > 0 and speed.crop_step_s is None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.net.block1.training and model.net.block2.training
    assert all(p.grad is None for p in model.parameters())


def test_resize_schedule_keeps_the_shape():
    import torch

    from cifarlab.budget import resize_schedule

    def lrs(total, resize_at=None, new_total=None):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=total, pct_start=0.25,
                                                    anneal_strategy="linear", cycle_momentum=False)
        out = []
        for step in range(new_total or total):
            if step == resize_at:
                resize_schedule(sched, total, new_total)
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step() if step < (new_total or total) - 1 else None
        return out

    grown, plain = lrs(100, resize_at=10, new_total=200), lrs(200)
    assert max(grown) == pytest.approx(1.0) and grown.index(max(grown)) == plain.index(max(plain))  # peak at 25%
    assert grown[-1] == pytest.approx(plain[-1]) and grown[150] == pytest.approx(plain[150])
