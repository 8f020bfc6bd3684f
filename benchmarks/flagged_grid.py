"""The training images cleanlab flags as likely mislabeled, ranks START+1 to START+COUNT, as a grid to look at by eye.

    python benchmarks/flagged_grid.py --data.root DIR --oof DIR/.cifarlab-cache/train-oof-fast-k2-50000.npz \
        --start 50 --count 50 --out /tmp/flagged

The ranking is the app's (Likely mislabeled tab, training split) and the report's: ``audit.label_issues`` on the
out-of-sample probabilities that ``cifarlab audit`` wrote. Each cell: rank, index in the training split, given label
-> the model's label, at 128x128 (bicubic from 32x32). Writes ``flagged_<first>-<last>.png`` pages of 25 and prints
one line per image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cifarlab.audit import label_issues
from cifarlab.data import CIFARDataModule

CELL = 128  # pixels per image
COLUMNS, PER_PAGE = 5, 25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data.root", dest="root", required=True)
    parser.add_argument("--oof", required=True, help="a train-oof-*.npz written by `cifarlab audit`")
    parser.add_argument("--start", type=int, default=0, help="ranks skipped (0: from the most likely error)")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--out", default=".")
    opts = parser.parse_args()
    train = CIFARDataModule(root=opts.root, val_size=0).load_splits()["train"]
    with np.load(opts.oof, allow_pickle=False) as z:
        probs, labels = z["probs"], z["labels"]
    if not np.array_equal(labels, train.labels):
        raise SystemExit(f"{opts.oof} was written for another training set than {opts.root}")
    issues = label_issues(labels, probs)
    ranks = list(range(opts.start, min(opts.start + opts.count, len(issues.flagged))))
    print(f"cleanlab flags {len(issues.flagged)} of {len(labels)} training images; showing ranks "
          f"{ranks[0] + 1}-{ranks[-1] + 1}" if ranks else "nothing to show")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    for first in range(0, len(ranks), PER_PAGE):
        page = ranks[first:first + PER_PAGE]
        rows = -(-len(page) // COLUMNS)
        canvas = Image.new("RGB", (COLUMNS * CELL, rows * (CELL + 30)), "white")
        draw = ImageDraw.Draw(canvas)
        for k, rank in enumerate(page):
            i = int(issues.flagged[rank])
            given, suggested = train.classes[labels[i]], train.classes[issues.suggested[i]]
            x, y = (k % COLUMNS) * CELL, (k // COLUMNS) * (CELL + 30)
            canvas.paste(Image.fromarray(train.images[i]).resize((CELL, CELL), Image.BICUBIC), (x, y))
            draw.text((x + 2, y + CELL + 2), f"{rank + 1} #{i}", fill="black")
            draw.text((x + 2, y + CELL + 15), f"{given}->{suggested}", fill="red")
            print(f"{rank + 1:4d}  #{i:<6d} {given} -> {suggested}")
        path = out / f"flagged_{page[0] + 1}-{page[-1] + 1}.png"
        canvas.save(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
