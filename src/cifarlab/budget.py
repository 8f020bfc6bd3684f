"""``cifarlab fit --budget 10m``: plan the whole schedule for the time there is, then build the run to that plan.

Lightning's ``max_time`` stops a run wherever it is, in the middle of its LR schedule. A budget instead sizes
the run before it is built: once the data is loaded, a short probe times this machine's training step (the
recipe's own network, batch, precision, augmentation and optimizer, on random pixels) and its evaluation
batch, and the plan is the largest number of optimizer steps whose training, per-epoch validation and
checkpoints, and the final test with the recipe's test-time augmentation end by ``start + budget``. The plan goes
into the run's configuration as plain numbers before the Trainer, model and data exist: the model's schedule length
(``model.schedule.total_steps``, which also ends the run), the data's cropped epochs
(``data.augment.early_crop_epochs``, the recipe's share of them) and the Trainer's limits, so the LR schedule,
Lookahead's ramp and progressive resizing are all laid over those steps: the run is complete, only shorter or longer.
Early in the run the plan is corrected once by the loop's own pace (``ImageClassifier.set_total_steps``). The
checkpoints record the plan that ran (the model's and data's hyperparameters, and this callback's state): a resumed
run keeps it.

Every ``fit``, with a budget or without, also sizes the training batch to the data first (``fit_batch_to_data``): a
recipe's batch that the training images hold fewer than ``MIN_BATCHES`` times becomes the largest power of two they
do hold that often, its learning rates scaled with it (``OptimizerConfig.for_batch``), both written into the config.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.fabric import Fabric
from lightning.pytorch.utilities import rank_zero_only

from cifarlab.data import MIN_BATCHES, CIFARDataModule, batch_for
from cifarlab.errors import ConfigError
from cifarlab.module import ImageClassifier
from cifarlab.settings import OptimizerConfig, migrate_hparams

SAFETY = 0.97  # plan to end at 97% of the budget: the probe's error is a few percent either way
STEP_OVERHEAD = 1.05  # a step inside Lightning's loop (logging, metrics, Lookahead) / the probe's bare step
                      # (docs/results.md, "Accuracy against the time budget")
REPLAN_FROM = 3  # steps: the pace is measured from here (the first steps build kernels and caches) ...
REPLAN_AT = 0.15  # ... to this share of the planned steps, then the plan is corrected once
EPOCH_OVERHEAD_S = 0.3  # seconds per epoch: checkpoint writes, loggers, data loader start
END_OVERHEAD_S = 4.0  # after the test: report plots, process exit
GROWTH = 1.5  # the Trainer's step limit over the plan: room for the early re-plan to lengthen the run
PLAN_ENV = "CIFARLAB_BUDGET_PLAN"  # rank 0's plan, inherited by the processes Lightning starts for the other ranks


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
    batch_note: str = ""  # why the batch is not the recipe's (``fit_batch_to_data``), if it is not


@rank_zero_only
def say(line: str) -> None:
    """A line on stdout from rank 0, beside cifarlab's precision line (stderr is for errors)."""
    print(line, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe_speed(module: ImageClassifier, datamodule: CIFARDataModule, device: torch.device,
                autocast=contextlib.nullcontext, steps: int = 2) -> Speed:
    """Time the recipe's training step and evaluation batch on ``device`` (under ``autocast()``, the precision's
    context), on random pixels; the module's weights, buffers, modes and gradients are restored afterwards. A warm-up
    call per shape lets the kernels be picked first. ``datamodule`` is set up."""
    start = time.perf_counter()
    module.to(device)
    saved = copy.deepcopy(module.state_dict())
    modes = {m: m.training for m in module.modules()}
    optimizer = module.make_optimizer()
    augment = datamodule.batch_augment
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
            with autocast():
                _, _, loss = module.logits_and_loss((xa, y))
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
        with torch.no_grad(), autocast():
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


# With selective TTA (``tta.confident_at`` < 1), the share of test images planned as getting the extra views: at 0.8
# the fast recipe's checkpoints sent 36% there, airbench94_muon's (label smoothing 0.2: less confident) 58%
# (docs/results.md, "Test-time augmentation"); planning for more only ends a run a few seconds early.
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


def replan_steps(plan: Plan, speed: Speed, measured_s: float, done: int, epoch: int, seconds_left: float,
                 whole_epochs: bool) -> int:
    """Total steps that fit ``seconds_left`` (until the deadline) at the pace measured in the loop (``measured_s``
    per step, since step ``REPLAN_FROM``), ``done`` steps and ``epoch`` epochs in: at least one more step."""
    cropping = epoch < plan.crop_epochs
    planned_s = (speed.crop_step_s if cropping and speed.crop_step_s else speed.step_s) * STEP_OVERHEAD
    pace = measured_s / planned_s  # > 1: slower than planned
    full_s = speed.step_s * STEP_OVERHEAD * pace
    crop_s = (speed.crop_step_s or speed.step_s) * STEP_OVERHEAD * pace
    spe, crop_total = plan.steps_per_epoch, plan.crop_epochs * plan.steps_per_epoch
    available = seconds_left * SAFETY - plan.test_s

    def cost(total: int) -> float:
        crop_left = max(min(crop_total, total) - done, 0)
        epochs_left = math.ceil(total / spe) - epoch
        return crop_left * crop_s + (total - done - crop_left) * full_s + epochs_left * (plan.val_s + EPOCH_OVERHEAD_S)

    total = max(most_steps(cost, available, start=done), done + 1)  # at least the step being taken
    if whole_epochs and total >= spe:
        total = max(total - total % spe, math.ceil((done + 1) / spe) * spe)
    return total


def step_limit(plan: Plan, whole_epochs: bool) -> int:
    """The Trainer's ``max_steps`` for a plan: ``GROWTH`` times its steps (whole epochs where it plans them), the
    most the early re-plan may give it; the run itself ends at the plan's steps (the model's schedule length)."""
    limit = math.ceil(plan.steps * GROWTH)
    return math.ceil(limit / plan.steps_per_epoch) * plan.steps_per_epoch if whole_epochs else limit


def saved_state(ckpt_path: str | None) -> dict | None:
    """A checkpoint file's contents (``None`` also for files that do not load: the CLI's checkpoint check reports
    those in one line)."""
    if not ckpt_path or not Path(ckpt_path).expanduser().is_file():
        return None
    try:
        ckpt = torch.load(Path(ckpt_path).expanduser(), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (any unreadable file: reported by the checkpoint check)
        return None
    return ckpt if isinstance(ckpt, dict) else None


def saved_plan(ckpt_path: str | None, state: dict | None = None) -> dict | None:
    """The budget plan a checkpoint carries (``state``: its contents, if already read), if any."""
    state = saved_state(ckpt_path) if state is None else state
    return next((v["plan"] for k, v in (state or {}).get("callbacks", {}).items()
                 if k.startswith("TimeBudget") and isinstance(v, dict) and v.get("plan")), None)


def fit_batch_to_data(config, state: dict | None = None) -> str | None:
    """Size ``fit``'s training batch to its data, in ``config`` (before anything is built from it): where the
    training images (per device) hold fewer than ``MIN_BATCHES`` batches, ``data.batch_size`` becomes the largest
    power of two they hold that often and ``model.optimizer`` is scaled for it as the recipes derive their learning
    rates (``OptimizerConfig.for_batch``), so that config.yaml and the checkpoints record what ran. A run resumed from
    the checkpoint ``state`` takes that checkpoint's batch and keeps its (already scaled) learning rates. Returns why
    the batch changed, in words, or ``None`` when the configured batch fits.

    Without ``--budget`` too: the fast recipe's batch of 1,536 is CIFAR-10's, and a user who points it at a few
    hundred images expects it to train, not to be told to work out a batch and its learning rates by hand."""
    dm = CIFARDataModule(**_section(config, "data"))
    recipe = dm.batch_size
    if dm.fewest_training_images() >= MIN_BATCHES * recipe * _most_devices(config["trainer"]):
        return None  # from the file list alone: no image decoded for a data set that holds the batch
    world = _probe_device(config["trainer"])[2]
    dm.prepare_data()
    dm.setup("fit")
    images = len(dm.train_set) // world
    batch = batch_for(images, recipe)
    if batch == recipe:
        return None
    per_device = " per device" if world > 1 else ""
    held = f"the {images:,} training images{per_device} hold fewer than {MIN_BATCHES} batches of {recipe}"
    resumed = ((state or {}).get("datamodule_hyper_parameters") or {}).get("batch_size")
    if resumed:  # the checkpoint's optimizer settings, already scaled for its batch (`--ckpt_path last` reads none)
        config["data"]["batch_size"] = resumed
        optimizer = migrate_hparams(state.get("hyper_parameters") or {}).get("optimizer")
        if optimizer:
            config["model"]["optimizer"] = Namespace(**optimizer)
        return f"{held}; the checkpoint's batch and learning rates"
    if batch < 2:
        raise ConfigError(f"the {images} training images{per_device} are too few to train on: batches of at least "
                          f"2 images (BatchNorm) need at least {2 * MIN_BATCHES} of them")
    optimizer, scaled = OptimizerConfig(**_section(config["model"], "optimizer")).for_batch(batch, recipe)
    config["data"]["batch_size"] = batch
    config["model"]["optimizer"] = Namespace(**asdict(optimizer))
    return f"{held}; {scaled}"


def budget_callback(config, subcommand: str | None, start: float) -> TimeBudget | None:
    """Plan a command's resolved ``config`` for its ``--budget`` and write the plan into it (before the Trainer,
    model and data are built from it); the ``TimeBudget`` callback that corrects it once and records it, or ``None``.

    A run resumed (``--ckpt_path``) from a budgeted checkpoint keeps that checkpoint's plan, with or without
    ``--budget``; ``--budget`` on a checkpoint trained without one is refused (its LR schedule has its own length).
    """
    text, ckpt = config.get("budget"), config.get("ckpt_path")
    if text is not None and subcommand != "fit":
        raise ConfigError(f"--budget plans training: it is for `cifarlab fit`, not `{subcommand}`")
    state = saved_state(ckpt) if subcommand == "fit" else None
    saved = saved_plan(ckpt, state) if state else None
    if text is None and saved is None:
        note = fit_batch_to_data(config, state) if subcommand == "fit" else None
        if note:
            say(f"cifarlab: batch {config['data']['batch_size']} ({note})")
        return None
    seconds = parse_budget(text) if text is not None else saved["budget_s"]
    if text is not None and time.time() - start >= seconds:
        raise ConfigError(f"--budget {text} is already spent by start-up ({time.time() - start:.0f} s): "
                          "give a longer budget")
    trainer = config["trainer"]
    if (trainer.get("accumulate_grad_batches") or 1) != 1 or trainer.get("limit_train_batches") not in (None, 1.0):
        raise ConfigError("--budget plans whole batches and optimizer steps: leave --trainer.accumulate_grad_batches "
                          "and --trainer.limit_train_batches at their defaults")
    if ckpt and saved is None:
        raise ConfigError(f"--ckpt_path {ckpt} was trained without --budget (its schedule has its own length): "
                          "resume it without --budget")
    note = fit_batch_to_data(config, state)
    whole_epochs = bool(config["checkpoint"].get("monitor"))
    if saved is not None:  # resumed: the loop continues to exactly the saved plan's end
        plan = Plan(**saved)
        write_plan(config, plan, plan.steps)
        return TimeBudget(plan, start, whole_epochs=whole_epochs)
    inherited = os.environ.get(PLAN_ENV) if _launched_rank() else None
    if inherited:  # a rank that rank 0's process started: its plan, not a probe of its own
        planned = json.loads(inherited)
        plan, speed = Plan(**planned["plan"]), Speed(**planned["speed"])
    else:
        plan, speed = plan_run(config, seconds, start, whole_epochs, note or "")
        os.environ[PLAN_ENV] = json.dumps({"plan": asdict(plan), "speed": asdict(speed)})
    write_plan(config, plan, step_limit(plan, whole_epochs))
    return TimeBudget(plan, start, speed, whole_epochs)


def _launched_rank() -> bool:
    """Whether this process is a rank other than the first (Lightning's launcher and torchrun set these)."""
    return any(int(os.environ.get(name, "0") or 0) > 0 for name in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def _most_devices(trainer: dict) -> int:
    """The most processes the configured Trainer can start, known without building it (``_probe_device`` builds)."""
    devices = trainer.get("devices")
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif str(devices).isdigit() and int(devices) > 0:
        count = int(devices)
    else:  # "auto", -1: every GPU, or one CPU process
        count = max(torch.cuda.device_count(), 1)
    return count * (trainer.get("num_nodes") or 1)


def _section(config, name: str) -> dict:
    """A config section (a jsonargparse ``Namespace``, a dict or ``None``) as a plain dict."""
    value = config.get(name) if hasattr(config, "get") else None
    if value is None:
        return {}
    return value.as_dict() if hasattr(value, "as_dict") else dict(value if isinstance(value, dict) else vars(value))


def plan_run(config, budget_s: float, start: float, whole_epochs: bool, batch_note: str = "") -> tuple[Plan, Speed]:
    """Build the recipe's model and data from ``config``, time them here (``probe_speed``) and plan the budget
    (``batch_note``: why the batch is not the recipe's, for the plan line)."""
    trainer = config["trainer"]
    device, autocast, world_size = _probe_device(trainer)
    dm = CIFARDataModule(**_section(config, "data"))
    dm.prepare_data()
    dm.setup("fit")
    model = ImageClassifier(**{**_section(config, "model"), "class_names": dm.classes})
    speed = probe_speed(model, dm, device, autocast)
    steps_per_epoch = len(dm.train_set) // (dm.batch_size * world_size)  # drop_last batches per rank
    if steps_per_epoch < 1:
        raise ConfigError(f"--data.batch_size {dm.batch_size} is larger than the {len(dm.train_set)} training "
                          "images: a budget needs at least one batch per epoch")
    epochs = trainer.get("max_epochs") or 0
    augment = dm.augment
    crop = augment.early_crop and augment.early_crop_epochs and epochs
    fraction = augment.early_crop_epochs / epochs if crop else 0.0  # the recipe's share of cropped epochs
    plan = make_plan(budget_s, start + budget_s, time.time(), speed, steps_per_epoch=steps_per_epoch,
                     val_images=len(dm.val_set or []) // world_size, test_images=len(dm.test_set) // world_size,
                     eval_batch_size=dm.eval_batch_size, tta_level=model.tta.level,
                     tta_confident_at=model.tta.confident_at, crop_fraction=fraction, whole_epochs=whole_epochs,
                     batch_size=dm.batch_size * world_size)
    plan.batch_note = batch_note
    return plan, speed


def _probe_device(trainer: dict) -> tuple[torch.device, object, int]:
    """The device, precision context and world size the configured Trainer will have (Lightning's own choice,
    through Fabric, which takes the same accelerator, devices and precision arguments)."""
    devices = trainer.get("devices") or "auto"
    strategy = trainer.get("strategy")
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)  # the Trainer prints its own precision line; Fabric's would be a second one
    try:
        fabric = Fabric(accelerator=trainer.get("accelerator") or "auto", devices=devices,
                        num_nodes=trainer.get("num_nodes") or 1, precision=trainer.get("precision"),
                        strategy=strategy if isinstance(strategy, str) else "auto")
    finally:
        logging.disable(previous)
    return fabric.device, fabric.autocast, fabric.world_size


def write_plan(config, plan: Plan, max_steps: int) -> None:
    """The plan as plain numbers in the run's configuration: the model's schedule length (where the run ends), the
    data's cropped epochs and the Trainer's limits (``max_steps``: at least the plan, room for the re-plan)."""
    config["trainer"]["max_steps"] = max_steps
    config["trainer"]["max_epochs"] = math.ceil(max_steps / plan.steps_per_epoch)
    model = config["model"]
    if model.get("schedule") is None:
        model["schedule"] = Namespace()
    model["schedule"]["total_steps"] = plan.steps
    augment = config["data"].get("augment")
    if augment is not None and augment.get("early_crop"):
        augment["early_crop_epochs"] = plan.crop_epochs


class TimeBudget(L.Callback):
    """Keeps a ``fit`` on its time budget's plan (see the module docstring); made by ``budget_callback``.

    Args:
        plan: the plan, already written into the run's configuration.
        start: ``time.time()`` when the command started.
        speed: the probe's timings (``None`` for a resumed run: its saved plan is not corrected again).
        whole_epochs: plan whole epochs only (recipes that choose a checkpoint on validation).
    """

    def __init__(self, plan: Plan, start: float, speed: Speed | None = None, whole_epochs: bool = False):
        self.plan = plan
        self.start = start
        self.speed = speed
        self.whole_epochs = whole_epochs
        self.pace_start: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Every rank must run the same plan (ranks started together, e.g. by torchrun, plan on their own).
        if stage != "fit" or trainer.world_size == 1:
            return
        ours = (self.plan.steps, self.plan.crop_epochs)
        same = tuple(trainer.strategy.broadcast(ours, src=0)) == ours
        if not trainer.strategy.reduce_boolean_decision(same, all=True):
            raise ConfigError("--budget: the ranks planned different runs (each probed on its own): start them "
                              "with Lightning's launcher (one command, --trainer.devices N)")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        plan, speed = self.plan, self.speed
        end = datetime.fromtimestamp(plan.expected_end).strftime("%H:%M:%S")
        crops = f", the first {plan.crop_epochs} on {trainer.datamodule.augment.early_crop}-px crops" \
            if plan.crop_epochs else ""
        batch = f" ({plan.batch_note})" if plan.batch_note else ""
        if speed is None:  # resumed: the plan came from the checkpoint
            say(f"cifarlab: budget {format_seconds(plan.budget_s)}: resuming the saved plan, "
                f"{plan.steps} steps in {plan.epochs} epochs{crops}")
            return
        say(
            f"cifarlab: budget {format_seconds(plan.budget_s)}: this machine trains {plan.train_img_per_s:,.0f} "
            f"img/s (probe, {speed.probe_s:.1f} s) -> {plan.steps} steps of {trainer.datamodule.batch_size}{batch} = "
            f"{plan.steps / plan.steps_per_epoch:.2f} epochs in {plan.epochs}{crops}, then the test; "
            f"expected end {end} ({format_seconds(plan.expected_end - self.start)} after start)")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Once, early, correct the plan with the loop's own pace (the probe times a bare step; the loop adds
        # logging, metrics and Lookahead, and a shared machine's speed drifts by a few percent either way).
        plan, step = self.plan, trainer.global_step
        if plan.replanned or self.speed is None:
            return
        if step == REPLAN_FROM:
            self.pace_start = time.perf_counter()
        elif step == max(REPLAN_FROM + 5, round(REPLAN_AT * plan.steps)) and step < plan.steps:
            measured = (time.perf_counter() - self.pace_start) / (step - REPLAN_FROM)
            total = None
            if trainer.is_global_zero:
                total = replan_steps(plan, self.speed, measured, step, trainer.current_epoch,
                                     self.start + plan.budget_s - time.time(), self.whole_epochs)
            total = min(trainer.strategy.broadcast(total, src=0), trainer.max_steps)
            self._resize(pl_module, total)

    def _resize(self, pl_module: ImageClassifier, total: int) -> None:
        """Stretch or shrink the rest of the run to ``total`` steps: the model's schedule, which ends the run."""
        old = self.plan.steps
        self.plan.replanned = True
        if total == old:
            return
        pl_module.set_total_steps(total)
        self.plan.steps = total
        self.plan.epochs = math.ceil(total / self.plan.steps_per_epoch)
        say(f"cifarlab: budget: the loop's pace re-planned the run to {total} steps "
            f"({total / self.plan.steps_per_epoch:.2f} epochs; {total - old:+d})")

    def state_dict(self) -> dict:
        return {"plan": asdict(self.plan)}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("plan"):
            self.plan = Plan(**state_dict["plan"])
