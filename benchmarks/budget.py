"""Accuracy against time budget on this machine: ``cifarlab fit --budget B`` next to the peer (airbench94's own
code, see ``benchmarks/peer.py``) given the same time, its epochs scaled to fit.

    python benchmarks/budget.py --data.root /tmp/data/cifar10-jpeg --budgets 2.5m 5m 10m 20m [--seeds 0] \
        [--config configs/fast.yaml] [--no_peer]

For each budget and seed: one ``cifarlab fit --config RECIPE --budget B`` command, timed from outside (start-up,
loading, probe, fit and test: all of it counts); then airbench94 for ``(B - its one-off costs) / its seconds per
epoch`` epochs, both measured first by two short peer runs (0.5 and 1.5 epochs) on this machine. The peer's time
covers only its own span (no process start-up or data loading), so it gets slightly more of the budget than
cifarlab does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import REPO, cifarlab_uses_bf16, cpu_line, pack, peer_in_child, run_cifarlab  # noqa: E402

from cifarlab.budget import format_seconds, parse_budget  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data.root", dest="root", required=True)
    parser.add_argument("--config", default=str(REPO / "configs" / "fast.yaml"))
    parser.add_argument("--budgets", nargs="+", default=["2.5m", "5m", "10m", "20m"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--run_dir", default="runs/budget")
    parser.add_argument("--no_peer", action="store_true", help="cifarlab only")
    parser.add_argument("extra", nargs="*", help="more `cifarlab fit` flags, after --")
    opts = parser.parse_args()
    run_dir = Path(opts.run_dir)
    print(cpu_line(), flush=True)
    peer_rate = None
    if not opts.no_peer:
        packed = pack(opts.root, run_dir / "airbench_data")
        bf16 = cifarlab_uses_bf16()
        # Two short runs separate the per-epoch time from the one-off costs (model, whitening, its loader's
        # first-epoch preprocessing, first-call kernel set-up), which a single run would charge to every epoch.
        short, longer = (peer_in_child(packed, e, 0, bf16) for e in (0.5, 1.5))
        per_epoch = longer["train_s"] - short["train_s"]
        fixed = max(short["train_s"] - 0.5 * per_epoch, 0.0) + (short["eval_s"] + longer["eval_s"]) / 2
        peer_rate = (per_epoch, fixed)
        print(f"airbench94 here ({'bf16 autocast' if bf16 else 'fp32'}): {per_epoch:.1f} s per epoch, "
              f"{fixed:.1f} s of one-off costs and its TTA evaluation", flush=True)
    rows = []
    for text in opts.budgets:
        budget = parse_budget(text)
        for seed in opts.seeds:
            ours = run_cifarlab(opts.root, opts.config, seed, run_dir / f"{text}_seed{seed}",
                                ["--budget", text, *opts.extra])
            print(f"budget {text}, seed {seed}: cifarlab {ours['acc']:.2%} in {ours['seconds']:.0f} s "
                  f"({ours['seconds'] / budget:.0%} of the budget)\n  {ours['plan']}", flush=True)
            theirs = None
            if peer_rate:
                epochs = round(max((budget - peer_rate[1]) / peer_rate[0], 0.1), 2)
                theirs = peer_in_child(packed, epochs, seed, bf16)
                print(f"budget {text}, seed {seed}: airbench94 {theirs['acc']:.2%} in {theirs['seconds']:.0f} s "
                      f"({epochs} epochs)", flush=True)
            rows.append((text, budget, seed, ours, theirs))
    print("\n| budget | seed | cifarlab acc | cifarlab wall | of budget | airbench94 epochs | airbench94 acc | "
          "airbench94 s | difference |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for text, budget, seed, ours, theirs in rows:
        peer_cells = (f"{theirs['epochs']} | {theirs['acc']:.2%} | {theirs['seconds']:.0f} | "
                      f"{ours['acc'] - theirs['acc']:+.2%}") if theirs else "- | - | - | -"
        print(f"| {text} | {seed} | {ours['acc']:.2%} | {format_seconds(ours['seconds'])} | "
              f"{ours['seconds'] / budget:.0%} | {peer_cells} |")


if __name__ == "__main__":
    main()
