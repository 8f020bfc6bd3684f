"""The peer, side by side: airbench94 (Keller Jordan's record code, PyPI ``airbench==0.1.8``) against
``cifarlab fit --config configs/fast.yaml``, on this CPU, alternating, one pair per seed.

    pip install airbench==0.1.8     # benchmark-only: the product never imports it
    python benchmarks/peer.py --data.root /tmp/data/cifar10-jpeg --seeds 0 1 2 [--peer_epochs 9.9] [-- FIT FLAGS]
    python benchmarks/peer.py --data.root /tmp/data/cifar10-jpeg --seeds 0 --fp32   # both sides in fp32

The peer runs its own ``train94`` with its recipe and hyperparameters unchanged. Only device plumbing differs
from its GPU script: the network is built on the CPU in fp32 (its ``make_net94`` calls ``.half().cuda()``),
wrapped in bf16 autocast where cifarlab would pick bf16 on this machine (``--fp32``: both sides in fp32, the
stand-in for a CPU without native bf16); CUDA events become CPU timers; its
loader reads the same ImageFolder copy, packed into its ``train.pt``/``test.pt`` format. Its time is the span of
its ``train94`` call (model and optimizer creation, its test loader, whitening, training) plus its final
evaluation with its TTA, without process start-up or data loading (its own timer leaves out the model, optimizer
and loader creation too: a second or two); cifarlab's time is the whole ``cifarlab fit`` command (start-up,
loading, fit, test with TTA), run on the CPU. Prints both accuracies, both times, the ratio of the means, and the
CPU's model and flags.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_line() -> str:
    """``lscpu``'s model name and flags (the flags that matter for speed first)."""
    from cifarlab.precision import cpu_info

    model, flags = cpu_info()
    key = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile") if f in (flags or ())]
    return (f"CPU: {model}; speed flags: {' '.join(key) or 'none of avx2/avx512/amx'}; "
            f"all flags: {' '.join(sorted(flags or []))}")


def pack(root: str, out: Path) -> Path:
    """The ImageFolder copy as airbench's ``train.pt``/``test.pt`` (uint8 NHWC images, labels, classes)."""
    import torch

    from cifarlab.data import CIFARDataModule

    dm = CIFARDataModule(root=root)
    splits = dm.load_splits()
    key = "|".join(f"{name}:{split.key}" for name, split in splits.items())  # the decode cache's content keys
    if (out / "source.txt").exists() and (out / "source.txt").read_text() == key:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        torch.save({"images": torch.from_numpy(split.images), "labels": torch.from_numpy(split.labels),
                    "classes": list(split.classes)}, out / f"{name}.pt")
    (out / "source.txt").write_text(key)
    return out


def run_peer(packed: Path, epochs: float, seed: int, bf16: bool) -> dict:
    """airbench94's ``train94`` on the CPU (in this process); returns accuracy (its TTA) and seconds."""
    import airbench
    import airbench.utils as utils
    import torch
    from airbench.lib_airbench94 import Conv, ConvGroup, Flatten, Mul, hyp
    from torch import nn

    class CPUEvent:  # torch.cuda.Event's timing interface, on the CPU clock
        def __init__(self, enable_timing: bool = True):
            self.t = 0.0

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end: CPUEvent) -> float:
            return 1000 * (end.t - self.t)

    torch.cuda.Event = CPUEvent
    torch.cuda.synchronize = lambda *a, **k: None
    original_loader = utils.CifarLoader

    def loader(path, train=True, batch_size=500, aug=None, drop_last=None, shuffle=None, altflip=False, gpu=0):
        made = original_loader(str(packed), train=train, batch_size=batch_size, aug=aug, drop_last=drop_last,
                               shuffle=shuffle, altflip=altflip, gpu="cpu")
        made.images = made.images.float()  # its loader makes fp16 for the GPU; the CPU runs fp32 (+ autocast)
        return made

    utils.CifarLoader = loader  # train() builds its test loader through this name

    class Autocast(nn.Sequential):
        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return super().forward(x).float()

    def make_net_cpu(widths=hyp["net"]["widths"], batchnorm_momentum=hyp["net"]["batchnorm_momentum"]):
        # make_net94 without .half().cuda(): the same layers, in the same order, fp32 on the CPU
        whiten_kernel_size = 2
        whiten_width = 2 * 3 * whiten_kernel_size**2
        net = Autocast(
            Conv(3, whiten_width, whiten_kernel_size, padding=0, bias=True),
            nn.GELU(),
            ConvGroup(whiten_width, widths["block1"], batchnorm_momentum),
            ConvGroup(widths["block1"], widths["block2"], batchnorm_momentum),
            ConvGroup(widths["block2"], widths["block3"], batchnorm_momentum),
            nn.MaxPool2d(3),
            Flatten(),
            nn.Linear(widths["block3"], 10, bias=False),
            Mul(hyp["net"]["scaling_factor"]),
        )
        net[0].weight.requires_grad = False
        return net.to(memory_format=torch.channels_last)

    torch.manual_seed(seed)
    train_loader = loader(None, train=True, batch_size=hyp["opt"]["batch_size"], aug=hyp["aug"], altflip=True)
    test_loader = loader(None, train=False, batch_size=2000)
    start = time.perf_counter()
    model = airbench.train94(train_loader=train_loader, epochs=epochs, make_net=make_net_cpu, verbose=False)
    train_s = time.perf_counter() - start
    acc = airbench.evaluate(model, test_loader, tta_level=hyp["net"]["tta_level"])
    total = time.perf_counter() - start
    return {"acc": acc, "seconds": total, "train_s": train_s, "eval_s": total - train_s, "epochs": epochs}


def run_cifarlab(root: str, config: str, seed: int, run_dir: Path, extra: list[str]) -> dict:
    """One ``cifarlab fit`` command, as a user runs it; returns accuracy (the recipe's TTA) and wall seconds."""
    cmd = [sys.executable, "-m", "cifarlab.cli", "fit", "--config", config, "--data.root", root,
           "--run.dir", str(run_dir), "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
           "--trainer.accelerator", "cpu", *extra]  # the peer runs on the CPU: so does cifarlab, GPU or not
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"cifarlab fit failed:\n{proc.stderr[-3000:]}")
    run = max(run_dir.glob("*/version_*"), key=lambda p: p.stat().st_mtime)
    metrics = json.loads((run / "test_metrics.json").read_text())
    plan = next((line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("cifarlab: budget")), "")
    precision = next((line for line in proc.stdout.splitlines() if line.startswith("cifarlab: precision")), "")
    return {"acc": metrics["test_acc"], "seconds": seconds, "plan": plan, "precision": precision}


def peer_child(opts) -> None:
    result = run_peer(Path(opts.packed), opts.peer_epochs, opts.seed, opts.bf16)
    print(json.dumps(result))


def peer_in_child(packed: Path, epochs: float, seed: int, bf16: bool) -> dict:
    """``run_peer`` in a fresh process (its monkeypatches and memory stay there)."""
    cmd = [sys.executable, __file__, "--child", "--packed", str(packed), "--peer_epochs", str(epochs),
           "--seed", str(seed)] + (["--bf16"] if bf16 else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"airbench94 failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cifarlab_uses_bf16() -> bool:
    from cifarlab.precision import fastest_precision

    return fastest_precision("cpu") == "bf16-mixed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data.root", dest="root")
    parser.add_argument("--config", default=str(REPO / "configs" / "fast.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--peer_epochs", type=float, default=9.9, help="airbench94's own length: 9.9")
    parser.add_argument("--target", type=float, default=0.907)
    parser.add_argument("--run_dir", default="runs/peer")
    parser.add_argument("--only", choices=["peer", "cifarlab"], help="run one side only")
    parser.add_argument("--fp32", action="store_true", help="both sides in fp32 (cifarlab: --trainer.precision "
                        "32-true), as on a CPU without native bf16")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--packed", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help="more `cifarlab fit` flags, after --")
    opts = parser.parse_args()
    if opts.child:
        return peer_child(opts)
    if not opts.root:
        parser.error("--data.root is required")
    run_dir = Path(opts.run_dir)
    packed = pack(opts.root, run_dir / "airbench_data")
    bf16 = cifarlab_uses_bf16() and not opts.fp32
    if opts.fp32:
        opts.extra += ["--trainer.precision", "32-true"]
    print(cpu_line())
    print(f"peer precision: {'bf16 autocast' if bf16 else 'fp32'} "
          f"({'forced' if opts.fp32 else 'what cifarlab picks here'}); "
          f"peer epochs: {opts.peer_epochs}; cifarlab: {opts.config} {' '.join(opts.extra)}", flush=True)
    rows = []
    for seed in opts.seeds:
        row = {"seed": seed}
        if opts.only != "cifarlab":
            row["peer"] = peer_in_child(packed, opts.peer_epochs, seed, bf16)
            print(f"seed {seed}: airbench94 {row['peer']['acc']:.2%} in {row['peer']['seconds']:.0f} s "
                  f"({row['peer']['epochs']} epochs)", flush=True)
        if opts.only != "peer":
            row["cifarlab"] = run_cifarlab(opts.root, opts.config, seed, run_dir / f"cifarlab_seed{seed}", opts.extra)
            print(f"seed {seed}: cifarlab   {row['cifarlab']['acc']:.2%} in {row['cifarlab']['seconds']:.0f} s  "
                  f"{row['cifarlab']['plan']}", flush=True)
        rows.append(row)
    print("\n| seed | airbench94 acc | airbench94 s | cifarlab acc | cifarlab s |\n|---:|---:|---:|---:|---:|")
    for row in rows:
        p, c = row.get("peer"), row.get("cifarlab")
        cells = [f"{p['acc']:.2%} | {p['seconds']:.0f}" if p else "- | -", f"{c['acc']:.2%} | {c['seconds']:.0f}"
                 if c else "- | -"]
        print(f"| {row['seed']} | {cells[0]} | {cells[1]} |")
    means = {}
    for side in ("peer", "cifarlab"):
        got = [r[side] for r in rows if side in r]
        if got:
            means[side] = (sum(g["acc"] for g in got) / len(got), sum(g["seconds"] for g in got) / len(got))
            print(f"mean {side}: {means[side][0]:.2%} in {means[side][1]:.0f} s over {len(got)} seed(s); "
                  f"reaches {opts.target:.1%}: {'yes' if means[side][0] >= opts.target else 'no'}")
    if len(means) == 2:
        print(f"time ratio cifarlab / airbench94: {means['cifarlab'][1] / means['peer'][1]:.2f} "
              f"(accuracy {means['cifarlab'][0] - means['peer'][0]:+.2%} points)")


if __name__ == "__main__":
    main()
