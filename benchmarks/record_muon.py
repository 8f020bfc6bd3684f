"""airbench94_muon (Keller Jordan's record script) on this CPU, changed only for the device, to know what the record
itself reaches on the JPEG copy before comparing cifarlab's port with it.

    python benchmarks/record_muon.py --script PATH/airbench94_muon.py --data.root /tmp/data/cifar10-jpeg \\
        --epochs 8 --seeds 0

The script comes from KellerJordan/cifar10-airbench (not vendored here). Changes, all plumbing: no
``torch.compile``, an fp32 network run under bf16 autocast instead of ``.half()`` on CUDA (its Newton-Schulz stays
bf16, as written), CPU timers for CUDA events, no warm-up run, the data packed from the ImageFolder copy as
``benchmarks/peer.py`` packs it, and ``--epochs`` for its fixed 8. The patched file is written beside ``--out``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

REPLACEMENTS = [
    ("@torch.compile\n", ""),
    ('map_location=torch.device("cuda")', 'map_location=torch.device("cpu")'),
    ("(self.images.half() / 255)", "(self.images.float() / 255)"),
    ("""            if isinstance(mod, BatchNorm):
                mod.float()
            else:
                mod.half()""", "            pass  # CPU plumbing: fp32 weights, bf16 autocast in forward"),
    ("""    def forward(self, x, whiten_bias_grad=True):
        b = self.whiten.bias""", """    def forward(self, x, whiten_bias_grad=True):
      with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
        b = self.whiten.bias"""),
    ("""        x = F.conv2d(x, self.whiten.weight, b if whiten_bias_grad else b.detach())
        x = self.layers(x)
        x = x.view(len(x), -1)
        return self.head(x) / x.size(-1)""",
     """        x = F.conv2d(x, self.whiten.weight, b if whiten_bias_grad else b.detach())
        x = self.layers(x)
        x = x.reshape(len(x), -1)
        return (self.head(x) / x.size(-1)).float()"""),
    ("""    starter = torch.cuda.Event(enable_timing=True)
    ender = torch.cuda.Event(enable_timing=True)
    time_seconds = 0.0
    def start_timer():
        starter.record()
    def stop_timer():
        ender.record()
        torch.cuda.synchronize()
        nonlocal time_seconds
        time_seconds += 1e-3 * starter.elapsed_time(ender)""", """    import time
    t0 = [0.0]
    time_seconds = 0.0
    def start_timer():
        t0[0] = time.perf_counter()
    def stop_timer():
        nonlocal time_seconds
        time_seconds += time.perf_counter() - t0[0]"""),
    ('CifarLoader("cifar10",', "CifarLoader(DATA,"),
    ("total_train_steps = ceil(8 * len(train_loader))", "total_train_steps = ceil(EPOCHS * len(train_loader))"),
]

MAIN = '''if __name__ == "__main__":
    DATA = sys.argv[1]
    BF16 = True
    EPOCHS = float(sys.argv[2])
    seeds = [int(a) for a in sys.argv[3:]]
    torch.manual_seed(0)
    model = CifarNet().to(memory_format=torch.channels_last)
    print_columns(logging_columns_list, is_head=True)
    accs = []
    for run in seeds:
        torch.manual_seed(run)
        accs.append(main(run, model))
    print("ACCS", accs, "mean", sum(accs) / len(accs))
'''


def patch(source: str) -> str:
    """The record's source with the CPU plumbing above; fails if the script no longer has a line it expects."""
    for old, new in REPLACEMENTS:
        if old not in source:
            raise SystemExit(f"airbench94_muon.py has changed: {old.splitlines()[0]!r} not found")
        source = source.replace(old, new)
    return source[:source.index('if __name__ == "__main__":')] + MAIN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", required=True, help="airbench94_muon.py from KellerJordan/cifar10-airbench")
    parser.add_argument("--data.root", dest="root", required=True)
    parser.add_argument("--epochs", type=float, default=8.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="runs/record_muon", help="folder for the packed data and patched script")
    opts = parser.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    from peer import cpu_line, pack

    out = Path(opts.out)
    packed = pack(opts.root, out / "packed")
    script = out / "airbench94_muon_cpu.py"
    script.write_text(patch(Path(opts.script).read_text()))
    print(cpu_line(), flush=True)
    subprocess.run([sys.executable, str(script), str(packed), str(opts.epochs), *map(str, opts.seeds)], check=True)


if __name__ == "__main__":
    main()
