"""Selective backprop's training step against the plain one, side by side in one process: what a step costs.

    python benchmarks/selective.py --data.root /tmp/cifar10-jpeg [--keep 0.5] [--scale_factor 1 0.5] [--repeats 7]

Builds the fast recipe as ``cifarlab fit --config fast`` does (airbench network, Muon, its batch, the precision
cifarlab picks for this CPU) and times ``ImageClassifier.training_step`` + backward + optimizer step on augmented
training batches of the real data: the plain step (the whole batch) and, for each ``--scale_factor``, the selective
step (the no-grad scoring forward of the whole batch in eval mode, then forward + backward of the ``--keep`` share with
the highest loss); also the parts: the scoring forward alone and the training forward alone (no backward), from which
the backward's share of a plain step follows. The kinds are timed in turns, ``--repeats`` rounds after a warm-up round,
so that a shared machine's slow spells fall on all of them alike; each is reported by its median and as a ratio of the
plain step's: the compute a selective step costs.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict

import torch
from steps import autocast_for, batches, fast_recipe, in_turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data.root", dest="root", required=True)
    parser.add_argument("--keep", type=float, default=0.5, help="share of the batch a selective step trains on")
    parser.add_argument("--scale_factor", type=float, nargs="+", default=[1.0, 0.5],
                        help="side of the scoring pass's images, one selective step timed per value")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (after one warm-up round)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the recipe's (1,536)")
    opts = parser.parse_args()

    from cifarlab.precision import cpu_info, fastest_precision
    from cifarlab.selective import SelectiveBackpropConfig, evaluating

    model, dm = fast_recipe(opts.root, *(["--data.batch_size", str(opts.batch_size)] if opts.batch_size else []))
    batch_size = min(dm.batch_size, len(dm.train_set))
    plain = asdict(SelectiveBackpropConfig())
    kinds = {"plain step": plain}
    for scale in opts.scale_factor:
        kinds[f"selective step, keep {opts.keep:g}, scoring at {scale:g}x"] = asdict(SelectiveBackpropConfig(
            keep=opts.keep, start=0.0, end=1.0, interrupt=0, scale_factor=scale))
    model.train()
    optimizer = model.make_optimizer()
    precision = fastest_precision("cpu")
    autocast = autocast_for(precision)

    def step(selective: dict, b) -> None:
        model.hparams.selective_backprop = selective
        with autocast():
            loss = model.training_step(b, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def scoring_forward(b) -> None:
        with torch.no_grad(), evaluating(model), autocast():
            model(b[0])

    def training_forward(b) -> None:
        with autocast():
            model.logits_and_loss(b)

    timed = {name: (lambda b, s=s: step(s, b)) for name, s in kinds.items()}
    timed["scoring forward alone (whole batch, eval, no grad)"] = scoring_forward
    timed["training forward alone (whole batch, no backward)"] = training_forward
    seconds, _ = in_turns(timed, batches(dm, batch_size), opts.repeats)
    model.hparams.selective_backprop = plain

    print(f"CPU: {cpu_info()[0]}; {torch.get_num_threads()} threads; {precision}; batch {batch_size}; "
          f"median of {opts.repeats} rounds")
    base = statistics.median(seconds["plain step"])
    print("| step | seconds | / plain step |\n|---|---|---|")
    for name, times in seconds.items():
        print(f"| {name} | {statistics.median(times):.3f} | {statistics.median(times) / base:.2f} |")
    backward = 1 - statistics.median(seconds["training forward alone (whole batch, no backward)"]) / base
    print(f"backward + optimizer step: {backward:.0%} of a plain step")


if __name__ == "__main__":
    from cifarlab.errors import CifarlabError

    try:
        main()
    except CifarlabError as error:  # bad data or flags: one line, as the commands say it
        raise SystemExit(f"{__file__.rsplit('/', 1)[-1]}: error: {error}") from None
