"""The images cleanlab flags as likely mislabeled, ranks START+1 to START+COUNT, as a grid to look at by eye.

    python benchmarks/flagged_grid.py --data.root DIR --oof DIR/.cifarlab-cache/train-oof-fast-k2-50000.npz \
        --start 50 --count 50 --out /tmp/flagged
    python benchmarks/flagged_grid.py --data.root DIR --ckpt A.ckpt [B.ckpt C.ckpt] --count 100 --out /tmp/flagged

The ranking is the app's (Likely mislabeled tab) and the report's: ``audit.label_issues`` on the training split's
out-of-sample probabilities that ``cifarlab audit`` wrote (``--oof``), or on the test split's probabilities of one
checkpoint or their mean over several (``--ckpt``, as ``cifarlab app --ckpt A B C``). Each cell: rank, index in the
split, given label -> the suggested label, at 128x128 (bicubic from 32x32). Writes ``flagged_<first>-<last>.png``
pages of 25 and prints one line per image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cifarlab.audit import label_issues, load_ensemble
from cifarlab.checkpoint import load_classifier
from cifarlab.datasets import DataSource
from cifarlab.inference import predict_test_set

CELL = 128  # pixels per image
COLUMNS, PER_PAGE = 5, 25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data.root", dest="root", required=True)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--oof", help="the training split: a train-oof-*.npz written by `cifarlab audit`")
    which.add_argument("--ckpt", nargs="+", help="the test split: one checkpoint, or several to average")
    parser.add_argument("--start", type=int, default=0, help="ranks skipped (0: from the most likely error)")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--out", default=".")
    parser.add_argument("--verdicts", help="a file of `<index> <E|A|C>` lines (clear label error, ambiguous, correct "
                                           "label) judged by eye: counts them over the ranks shown")
    opts = parser.parse_args()
    data = DataSource(opts.root)
    if opts.oof:
        split = data.load_split("train")
        with np.load(opts.oof, allow_pickle=False) as z:
            probs, labels = z["probs"], z["labels"]
        if not np.array_equal(labels, split.labels):
            raise SystemExit(f"{opts.oof} was written for another training set than {opts.root}")
        name = "training"
    else:
        split, name = data.test_set, "test"
        model = load_classifier(opts.ckpt[0])
        members = [(opts.ckpt[0], model), *load_ensemble(opts.ckpt[1:], list(model.class_names), opts.ckpt[0])]
        probs = np.mean([predict_test_set(m, path, data).probs for path, m in members], axis=0)
        labels = split.labels.numpy()
        print(f"test probabilities: the mean of {len(members)} checkpoint(s), accuracy "
              f"{(probs.argmax(1) == labels).mean():.2%}")
    classes = list(data.class_names)
    issues = label_issues(labels, probs)
    ranks = list(range(opts.start, min(opts.start + opts.count, len(issues.flagged))))
    print(f"cleanlab flags {len(issues.flagged)} of {len(labels)} {name} images; "
          + (f"showing ranks {ranks[0] + 1}-{ranks[-1] + 1}" if ranks else "nothing to show"))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    for first in range(0, len(ranks), PER_PAGE):
        page = ranks[first:first + PER_PAGE]
        rows = -(-len(page) // COLUMNS)
        canvas = Image.new("RGB", (COLUMNS * CELL, rows * (CELL + 30)), "white")
        draw = ImageDraw.Draw(canvas)
        for k, rank in enumerate(page):
            i = int(issues.flagged[rank])
            given, suggested = classes[labels[i]], classes[issues.suggested[i]]
            x, y = (k % COLUMNS) * CELL, (k // COLUMNS) * (CELL + 30)
            canvas.paste(Image.fromarray(split.images[i]).resize((CELL, CELL), Image.BICUBIC), (x, y))
            draw.text((x + 2, y + CELL + 2), f"{rank + 1} #{i}", fill="black")
            draw.text((x + 2, y + CELL + 15), f"{given}->{suggested}", fill="red")
            print(f"{rank + 1:4d}  #{i:<6d} {given} -> {suggested}")
        path = out / f"flagged_{page[0] + 1}-{page[-1] + 1}.png"
        canvas.save(path)
        print(f"wrote {path}")
    if opts.verdicts and ranks:
        lines = Path(opts.verdicts).read_text().splitlines()
        judged = dict(line.split()[:2] for line in lines if line.strip() and not line.startswith("#"))
        seen = [judged.get(str(int(issues.flagged[rank])), "?") for rank in ranks]
        names = {"E": "clear label errors", "A": "ambiguous", "C": "correctly labelled", "?": "not judged"}
        print(f"by eye ({opts.verdicts}), ranks {ranks[0] + 1}-{ranks[-1] + 1}: "
              + ", ".join(f"{seen.count(k)} {name}" for k, name in names.items() if seen.count(k)))


if __name__ == "__main__":
    main()
