"""``cifarlab fit --budget 10m``: plan the whole schedule for the time there is.

Lightning's ``max_time`` stops a run wherever it is, in the middle of its LR schedule. A budget instead sizes
the run before it starts: once the data is loaded, a short probe times this machine's training step (the
recipe's own network, batch, precision, augmentation and optimizer, on random pixels) and its evaluation
batch, and the plan is the largest number of optimizer steps whose training, per-epoch validation and
checkpoints, and the final test with the recipe's test-time augmentation end by ``start + budget``. The LR
schedule, Lookahead's ramp and progressive resizing (the recipe's share of cropped epochs) are all laid over
those steps, so the run is complete, only shorter or longer. The plan is saved in checkpoints: a resumed run
keeps it.
"""

from __future__ import annotations

import copy
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from cifarlab.errors import ConfigError

SAFETY = 0.97  # plan to end at 97% of the budget: the probe's error is a few percent either way
STEP_OVERHEAD = 1.05  # a step inside Lightning's loop (logging, metrics, Lookahead) / the probe's bare step
                      # (docs/benchmarks.md, "Time budget: `cifarlab fit --budget B`")
REPLAN_FROM = 3  # steps: the pace is measured from here (the first steps build kernels and caches) ...
REPLAN_AT = 0.15  # ... to this share of the planned steps, then the plan is corrected once
EPOCH_OVERHEAD_S = 0.3  # seconds per epoch: checkpoint writes, loggers, data loader start
END_OVERHEAD_S = 4.0  # after the test: report plots, process exit


def parse_budget(text: str) -> float:
    """``"10m"``, ``"90s"``, ``"1h30m"``, ``"2.5m"`` or plain seconds ``"600"`` -> seconds; anything else, zero or
    a negative duration is a ``ConfigError``."""
    raw = str(text).strip().lower().replace(" ", "")
    if raw.startswith("-"):
        raise ConfigError(f"--budget {text} is negative: give a positive duration such as 10m")
    num = r"(\d+(?:\.\d*)?|\.\d+)"
    match = re.fullmatch(num, raw) or re.fullmatch(f"(?:{num}h)?(?:{num}m(?:in)?)?(?:{num}s(?:ec)?)?", raw)
    if not raw or not match:
        raise ConfigError(f"--budget {text!r} is not a duration: write it like 10m, 90s, 1h30m or 600 (seconds)")
    if len(match.groups()) == 1:
        seconds = float(match.group(1))
    else:
        hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = 3600 * hours + 60 * minutes + secs
    if seconds <= 0:
        raise ConfigError(f"--budget {text} leaves no time: give a positive duration such as 10m")
    return seconds


def format_seconds(seconds: float) -> str:
    """``612.3`` -> ``"10m 12s"``."""
    seconds = round(seconds)
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def process_start_time() -> float:
    """Wall-clock time (``time.time()`` scale) when this process started, so that start-up counts against the
    budget; the import time of this module where ``/proc`` is not available."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        start = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT
    # (containers with their own time namespace can report a boot time that is not the host's)
    return start if _IMPORTED_AT - 3600 < start <= _IMPORTED_AT else _IMPORTED_AT


_IMPORTED_AT = time.time()


@dataclass
class Speed:
    """Seconds per training step (full size and, if the recipe crops early, cropped) and per evaluation batch."""

    step_s: float
    crop_step_s: float | None
    eval_batch_s: float
    probe_s: float


@dataclass
class Plan:
    """What the budget buys: optimizer steps, epochs, cropped epochs, and the expected end."""

    budget_s: float
    steps: int
    epochs: int
    steps_per_epoch: int
    crop_epochs: int
    expected_end: float  # time.time() scale
    train_img_per_s: float
    test_s: float = 0.0  # planned seconds of the final test (TTA) and reports
    val_s: float = 0.0  # planned seconds of one validation pass
    replanned: bool = False


@rank_zero_only
def say(line: str) -> None:
    """A line on stdout from rank 0, beside cifarlab's precision line (stderr is for errors)."""
    print(line, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_speed(trainer: L.Trainer, module, datamodule, steps: int = 2) -> Speed:
    """Time the recipe's training step and evaluation batch here, on random pixels; the module's weights,
    buffers and gradients are restored afterwards. A warm-up call per shape lets the kernels be picked first."""
    start = time.perf_counter()
    device = trainer.strategy.root_device
    module.to(device)
    saved = copy.deepcopy(module.state_dict())
    modes = {m: m.training for m in module.modules()}
    optimizer = module.make_optimizer()
    augment = getattr(datamodule, "_batch_augment", None)
    if augment is not None:
        augment.to(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    num_classes = module.hparams.num_classes

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        # NHWC pixels seen as (n, 3, 32, 32), as the dataset serves them
        x = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen).permute(0, 3, 1, 2)
        return x.to(device), torch.randint(0, num_classes, (n,), generator=gen).to(device)

    def per_sample_seconds() -> float:
        # The albumentations back end prepares every batch image by image, on the same cores as training.
        train_set = datamodule.train_set
        if train_set.transform is None:
            return 0.0
        n = min(datamodule.batch_size, len(train_set))
        t0 = time.perf_counter()
        train_set.__getitems__(list(range(n)))
        return (time.perf_counter() - t0) * datamodule.batch_size / n

    def train_seconds(crop: int | None) -> float:
        x, y = batch(datamodule.batch_size)
        times = []
        module.train()
        for i in range(steps + 1):
            _sync(device)
            t0 = time.perf_counter()
            xa = augment(x, crop) if augment is not None else x
            with trainer.precision_plugin.forward_context():
                _, _, loss = module._step((xa, y))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            if i:  # the first call builds the kernels for these shapes
                times.append(time.perf_counter() - t0)
        return min(times)

    def eval_seconds() -> float:
        x, _ = batch(datamodule.eval_batch_size)
        module.eval()
        times = []
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for _ in range(2):
                _sync(device)
                t0 = time.perf_counter()
                module(x)
                _sync(device)
                times.append(time.perf_counter() - t0)
        return times[-1]

    # The probe's random draws must not move the run's seeded streams (shuffles, augmentation).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            data_s = per_sample_seconds()
            step_s = train_seconds(None) + data_s
            aug = datamodule.augment
            crop_s = train_seconds(aug.early_crop) + data_s if aug.early_crop and aug.early_crop_epochs else None
            eval_s = eval_seconds()
        finally:
            module.load_state_dict(saved)
            for m, training in modes.items():
                m.training = training
            for p in module.parameters():
                p.grad = None
    return Speed(step_s, crop_s, eval_s, time.perf_counter() - start)


def resize_schedule(scheduler, old_total: int, new_total: int) -> None:
    """Give a OneCycleLR schedule ``new_total`` steps instead of ``old_total``, each phase keeping its share, from
    where it is now (the LR moves by the change in phase position only)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
        return
    scale = new_total / old_total
    for phase in scheduler._schedule_phases:  # end steps are pct * total - 1, as OneCycleLR builds them
        phase["end_step"] = (phase["end_step"] + 1) * scale - 1
    scheduler._schedule_phases[-1]["end_step"] = new_total - 1
    scheduler.total_steps = new_total


# With selective TTA (``tta.confident_at`` < 1), the share of test images planned as getting the extra views: at 0.8
# the fast recipe's checkpoints sent 36% there, airbench94_muon's (label smoothing 0.2: less confident) 58%
# (docs/benchmarks.md, "Selective TTA"); planning for more only ends a run a few seconds early.
UNSURE_SHARE = 0.6


def tta_passes(level: int, confident_at: float = 1.0) -> float:
    """Forward passes per test image at ``tta_level``: 1, mirror 2, mirror + two translations 6; with selective TTA,
    1 plus the extra passes for ``UNSURE_SHARE`` of the images."""
    passes = {0: 1, 1: 2}.get(level, 6)
    return passes if confident_at >= 1 else 1 + (passes - 1) * UNSURE_SHARE


def most_steps(cost, available: float, start: int) -> int:
    """The largest step count ``n >= start`` with ``cost(n) <= available`` (``cost`` grows with ``n``; ``start``
    if even one more step does not fit): doubling, then bisection."""
    lo, hi = start, start + 1
    while cost(hi) <= available:
        lo, hi = hi, start + 2 * (hi - start)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= available else (lo, mid)
    return lo


def make_plan(budget_s: float, deadline: float, now: float, speed: Speed, *, steps_per_epoch: int, val_images: int,
              test_images: int, eval_batch_size: int, tta_level: int, crop_fraction: float, whole_epochs: bool,
              batch_size: int, tta_confident_at: float = 1.0) -> Plan:
    """The most optimizer steps whose training, validation, checkpoints and final test end by ``deadline``
    (aiming at ``SAFETY`` of the time left). ``crop_fraction`` of the epochs (rounded) train on early crops;
    ``whole_epochs`` rounds down to whole epochs (recipes that pick a checkpoint on validation)."""
    batches = lambda n: math.ceil(n / eval_batch_size) if n else 0  # noqa: E731
    test_s = batches(test_images) * speed.eval_batch_s * tta_passes(tta_level, tta_confident_at) + END_OVERHEAD_S
    val_s = batches(val_images) * speed.eval_batch_s
    sanity_s = min(2, batches(val_images)) * speed.eval_batch_s  # Lightning's sanity check: 2 validation batches
    available = (deadline - now) * SAFETY - test_s - sanity_s
    step_s = speed.step_s * STEP_OVERHEAD
    crop_step_s = (speed.crop_step_s or speed.step_s) * STEP_OVERHEAD

    def cost(steps: int) -> tuple[float, int, int]:
        epochs = math.ceil(steps / steps_per_epoch)
        crop_epochs = min(round(crop_fraction * steps / steps_per_epoch), epochs) if speed.crop_step_s else 0
        crop_steps = min(crop_epochs * steps_per_epoch, steps)
        seconds = crop_steps * crop_step_s + (steps - crop_steps) * step_s + epochs * (val_s + EPOCH_OVERHEAD_S)
        return seconds, epochs, crop_epochs

    steps = most_steps(lambda n: cost(n)[0], available, start=0)
    if whole_epochs and steps >= steps_per_epoch:
        steps -= steps % steps_per_epoch
    if steps < 1:
        need = speed.step_s + test_s + val_s + sanity_s + EPOCH_OVERHEAD_S
        raise ConfigError(f"--budget {format_seconds(budget_s)} is too short to train one step here: "
                          f"{format_seconds(max(deadline - now, 0))} are left after start-up and loading, and one "
                          f"step plus the test takes ~{format_seconds(need)}; give a longer budget")
    seconds, epochs, crop_epochs = cost(steps)
    end = now + (seconds + test_s + sanity_s)
    return Plan(budget_s, steps, epochs, steps_per_epoch, crop_epochs, end, batch_size / speed.step_s, test_s, val_s)


def saved_plan(ckpt_path: str | None) -> dict | None:
    """The budget plan a checkpoint carries, if any (``None`` also for files that do not load: the CLI's
    checkpoint check reports those in one line)."""
    if not ckpt_path or not Path(ckpt_path).expanduser().is_file():
        return None
    try:
        ckpt = torch.load(Path(ckpt_path).expanduser(), map_location="cpu", weights_only=True)
        return next((v["plan"] for k, v in ckpt.get("callbacks", {}).items()
                     if k.startswith("TimeBudget") and v.get("plan")), None)
    except Exception:  # noqa: BLE001  (any unreadable file: reported by the checkpoint check)
        return None


def budget_callback(config, subcommand: str | None, start: float) -> TimeBudget | None:
    """The ``TimeBudget`` a command's resolved config asks for, checked, or ``None``.

    A run resumed (``--ckpt_path``) from a budgeted checkpoint keeps that checkpoint's plan, with or without
    ``--budget``; ``--budget`` on a checkpoint trained without one is refused (its LR schedule has its own length).
    """
    text, ckpt = config.get("budget"), config.get("ckpt_path")
    plan = saved_plan(ckpt) if subcommand == "fit" else None
    if text is None:
        return TimeBudget(plan["budget_s"], start, resume=True) if plan else None
    if subcommand != "fit":
        raise ConfigError(f"--budget plans training: it is for `cifarlab fit`, not `{subcommand}`")
    seconds = parse_budget(text)
    if time.time() - start >= seconds:
        raise ConfigError(f"--budget {text} is already spent by start-up ({time.time() - start:.0f} s): "
                          "give a longer budget")
    trainer = config["trainer"]
    if (trainer.get("accumulate_grad_batches") or 1) != 1 or trainer.get("limit_train_batches") not in (None, 1.0):
        raise ConfigError("--budget plans whole batches and optimizer steps: leave --trainer.accumulate_grad_batches "
                          "and --trainer.limit_train_batches at their defaults")
    if ckpt and plan is None:
        raise ConfigError(f"--ckpt_path {ckpt} was trained without --budget (its schedule has its own length): "
                          "resume it without --budget")
    augment = config["data"].get("augment") or {}
    augment = augment if isinstance(augment, dict) else vars(augment)
    epochs = trainer.get("max_epochs") or 0
    crop = augment.get("early_crop") and augment.get("early_crop_epochs") and epochs
    fraction = augment["early_crop_epochs"] / epochs if crop else 0.0  # the recipe's share of cropped epochs
    return TimeBudget(seconds, start, crop_fraction=fraction, whole_epochs=bool(config["checkpoint"].get("monitor")),
                      resume=bool(ckpt))


class TimeBudget(L.Callback):
    """Sizes ``fit`` to a time budget (see the module docstring). Added by ``cifarlab fit --budget``.

    Args:
        budget_s: seconds for the whole command, fit and test, counted from ``start``.
        start: ``time.time()`` when the command started (default: this process's start).
        crop_fraction: share of the epochs trained on early crops (the recipe's ``early_crop_epochs /
            max_epochs``).
        whole_epochs: plan whole epochs only (recipes that choose a checkpoint on validation).
        resume: the run resumes from a checkpoint: keep the plan saved in it instead of probing.
    """

    def __init__(self, budget_s: float, start: float | None = None, crop_fraction: float = 0.0,
                 whole_epochs: bool = False, resume: bool = False):
        self.budget_s = budget_s
        self.start = process_start_time() if start is None else start
        self.crop_fraction = crop_fraction
        self.whole_epochs = whole_epochs
        self.resume = resume
        self.plan: Plan | None = None
        self.speed: Speed | None = None
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        if self.resume:
            return  # load_state_dict brings the plan
        dm = trainer.datamodule
        # Every rank probes (they share the machine as they will in training); rank 0's plan is everyone's.
        speed = probe_speed(trainer, pl_module, dm)
        steps_per_epoch = len(dm.train_set) // (dm.batch_size * trainer.world_size)  # drop_last batches per rank
        if steps_per_epoch < 1:
            raise ConfigError(f"--data.batch_size {dm.batch_size} is larger than the {len(dm.train_set)} training "
                              "images: a budget needs at least one batch per epoch")
        plan = None
        if trainer.is_global_zero:  # one rank decides, so every rank gets the same plan or the same error
            try:
                plan = make_plan(self.budget_s, self.start + self.budget_s, time.time(), speed,
                                 steps_per_epoch=steps_per_epoch,
                                 val_images=len(dm.val_set or []) // trainer.world_size,
                                 test_images=len(dm.test_set) // trainer.world_size,
                                 eval_batch_size=dm.eval_batch_size, tta_level=pl_module.tta.level,
                                 tta_confident_at=pl_module.tta.confident_at,
                                 crop_fraction=self.crop_fraction, whole_epochs=self.whole_epochs,
                                 batch_size=dm.batch_size * trainer.world_size)
            except ConfigError as err:
                plan = str(err)
        plan = trainer.strategy.broadcast(plan, src=0)
        if isinstance(plan, str):
            raise ConfigError(plan)
        self.speed = speed
        self._apply(plan)

    def _apply(self, plan: Plan) -> None:
        trainer = self._trainer
        self.plan = plan
        trainer.fit_loop.max_epochs = plan.epochs
        trainer.fit_loop.epoch_loop.max_steps = plan.steps
        dm = trainer.datamodule
        if dm.augment.early_crop:
            dm.augment.early_crop_epochs = plan.crop_epochs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Once, early, correct the plan with the loop's own pace (the probe times a bare step; the loop adds
        # logging, metrics and Lookahead, and a shared machine's speed drifts by a few percent either way).
        plan, step = self.plan, trainer.global_step
        if plan is None or plan.replanned or self.speed is None:
            return
        if step == REPLAN_FROM:
            self._pace_start = time.perf_counter()
        elif step == max(REPLAN_FROM + 5, round(REPLAN_AT * plan.steps)) and step < plan.steps:
            measured = (time.perf_counter() - self._pace_start) / (step - REPLAN_FROM)
            total = None
            if trainer.is_global_zero:
                total = self._replanned_steps(trainer, measured)
            self._resize(trainer, trainer.strategy.broadcast(total, src=0))

    def _replanned_steps(self, trainer: L.Trainer, measured_s: float) -> int:
        """Total steps that fit the time left, at the pace measured since step ``REPLAN_FROM``."""
        plan, speed, done = self.plan, self.speed, trainer.global_step
        cropping = trainer.current_epoch < plan.crop_epochs
        planned_s = (speed.crop_step_s if cropping and speed.crop_step_s else speed.step_s) * STEP_OVERHEAD
        pace = measured_s / planned_s  # > 1: slower than planned
        full_s = speed.step_s * STEP_OVERHEAD * pace
        crop_s = (speed.crop_step_s or speed.step_s) * STEP_OVERHEAD * pace
        spe, crop_total = plan.steps_per_epoch, plan.crop_epochs * plan.steps_per_epoch
        available = (self.start + plan.budget_s - time.time()) * SAFETY - plan.test_s

        def cost(total: int) -> float:
            crop_left = max(min(crop_total, total) - done, 0)
            epochs_left = math.ceil(total / spe) - trainer.current_epoch
            return crop_left * crop_s + (total - done - crop_left) * full_s + epochs_left * (plan.val_s +
                                                                                           EPOCH_OVERHEAD_S)

        lo = max(most_steps(cost, available, start=done), done + 1)  # at least the step being taken
        if self.whole_epochs and lo >= spe:
            lo = max(lo - lo % spe, math.ceil((done + 1) / spe) * spe)
        return lo

    def _resize(self, trainer: L.Trainer, total: int) -> None:
        """Stretch or shrink the rest of the run to ``total`` steps: loop limits and the LR schedule."""
        old = self.plan.steps
        self.plan.replanned = True
        if total == old:
            return
        for config in trainer.lr_scheduler_configs:
            resize_schedule(config.scheduler, old, total)
        self.plan.steps = total
        self.plan.epochs = math.ceil(total / self.plan.steps_per_epoch)
        trainer.fit_loop.max_epochs = self.plan.epochs
        trainer.fit_loop.epoch_loop.max_steps = total
        say(f"cifarlab: budget: the loop's pace re-planned the run to {total} steps "
            f"({total / self.plan.steps_per_epoch:.2f} epochs; {total - old:+d})")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        plan, speed = self.plan, self.speed
        if plan is None:
            return
        end = datetime.fromtimestamp(plan.expected_end).strftime("%H:%M:%S")
        crops = f", the first {plan.crop_epochs} on {trainer.datamodule.augment.early_crop}-px crops" \
            if plan.crop_epochs else ""
        if speed is None:  # resumed: the plan came from the checkpoint
            say(f"cifarlab: budget {format_seconds(plan.budget_s)}: resuming the saved plan, "
                           f"{plan.steps} steps in {plan.epochs} epochs{crops}")
            return
        say(
            f"cifarlab: budget {format_seconds(plan.budget_s)}: this machine trains {plan.train_img_per_s:,.0f} "
            f"img/s (probe, {speed.probe_s:.1f} s) -> {plan.steps} steps of {trainer.datamodule.batch_size} = "
            f"{plan.steps / plan.steps_per_epoch:.2f} epochs in {plan.epochs}{crops}, then the test; "
            f"expected end {end} ({format_seconds(plan.expected_end - self.start)} after start)")

    def state_dict(self) -> dict:
        return {"plan": asdict(self.plan)} if self.plan else {}

    def load_state_dict(self, state_dict: dict) -> None:
        # A resumed run keeps the schedule it was planned with (called after setup, before the optimizers exist).
        if state_dict.get("plan") and self._trainer is not None:
            self.speed = None
            self._apply(Plan(**state_dict["plan"]))
