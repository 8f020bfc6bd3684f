"""The images cleanlab flags as likely mislabeled, ranks START+1 to START+COUNT, as a grid to look at by eye.

    python benchmarks/flagged_grid.py --data.root DIR --oof DIR/.cifarlab-cache/train-oof-fast-k2-50000.npz \
        --start 50 --count 50 --out /tmp/flagged
    python benchmarks/flagged_grid.py --data.root DIR --ckpt A.ckpt [B.ckpt C.ckpt] --count 100 --out /tmp/flagged
    python benchmarks/flagged_grid.py --data.root DIR --ckpt A.ckpt --blind benchmarks/label_verdicts.txt --out /tmp/b

The ranking is the app's (Likely mislabeled tab) and the report's: ``audit.label_issues`` on the training split's
out-of-sample probabilities that ``cifarlab audit`` wrote (``--oof``), or on the test split's probabilities of one
checkpoint or their mean over several (``--ckpt``, as ``cifarlab app --ckpt A B C``). Each cell: rank, index in the
split, given label -> the suggested label, at 128x128 (bicubic from 32x32). Writes ``flagged_<first>-<last>.png``
pages of 25 and prints one line per image.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from sklearn.metrics import cohen_kappa_score

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
    parser.add_argument("--verdicts", nargs="+", default=[],
                        help="files of `<index> <E|A|C>` lines (clear label error, ambiguous, correct label) judged "
                             "by eye, one per reviewer: counts them over the ranks shown, and how often two agree")
    parser.add_argument("--blind", help="a verdicts file: draw the images it judged, shuffled, without ranks or "
                                        "verdicts, for another reviewer")
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
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    if opts.blind:
        shown = np.random.default_rng(0).permutation(sorted(int(i) for i in read_verdicts(opts.blind)))
        cells = [(f"#{i}", classes[labels[i]], classes[probs[i].argmax()], i) for i in shown]
        print(f"{len(cells)} images judged in {opts.blind}, shuffled, with the given label -> the model's")
        draw_pages(cells, split.images, out, "blind")
        return
    ranks = list(range(opts.start, min(opts.start + opts.count, len(issues.flagged))))
    print(f"cleanlab flags {len(issues.flagged)} of {len(labels)} {name} images; "
          + (f"showing ranks {ranks[0] + 1}-{ranks[-1] + 1}" if ranks else "nothing to show"))
    shown = [int(issues.flagged[rank]) for rank in ranks]
    cells = [(f"{rank + 1} #{i}", classes[labels[i]], classes[issues.suggested[i]], i) for rank, i in zip(ranks, shown)]
    for rank, (_, given, suggested, i) in zip(ranks, cells):
        print(f"{rank + 1:4d}  #{i:<6d} {given} -> {suggested}")
    draw_pages(cells, split.images, out, "flagged", first_number=opts.start + 1)
    if ranks:
        count_verdicts(opts.verdicts, shown, f"ranks {ranks[0] + 1}-{ranks[-1] + 1}")


def read_verdicts(path: str) -> dict[str, str]:
    """``{index: verdict}`` from a file of ``<index> <E|A|C>`` lines (``#`` starts a comment line)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise SystemExit(f"--verdicts/--blind {path}: {err.strerror}: pass a file of `<index> <E|A|C>` lines") from None
    verdicts = {}
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or line.startswith("#"):
            continue
        if len(fields) < 2 or not fields[0].isdigit() or fields[1] not in ("E", "A", "C"):
            raise SystemExit(f"{path}, line {number}: {line.strip()!r} is not `<index> <E|A|C>`: correct or remove it")
        verdicts[fields[0]] = fields[1]
    return verdicts


def draw_pages(cells: list[tuple[str, str, str, int]], images: np.ndarray, out: Path, prefix: str,
               first_number: int = 1) -> None:
    """Pages of ``PER_PAGE`` cells ``(title, given, other, index)``: the image at ``CELL`` pixels, the title, and
    ``given->other`` in red (cleanlab's suggested class; on blind pages the model's prediction)."""
    for first in range(0, len(cells), PER_PAGE):
        page = cells[first:first + PER_PAGE]
        rows = -(-len(page) // COLUMNS)
        canvas = Image.new("RGB", (COLUMNS * CELL, rows * (CELL + 30)), "white")
        draw = ImageDraw.Draw(canvas)
        for k, (title, given, suggested, i) in enumerate(page):
            x, y = (k % COLUMNS) * CELL, (k // COLUMNS) * (CELL + 30)
            canvas.paste(Image.fromarray(images[i]).resize((CELL, CELL), Image.BICUBIC), (x, y))
            draw.text((x + 2, y + CELL + 2), title, fill="black")
            draw.text((x + 2, y + CELL + 15), f"{given}->{suggested}", fill="red")
        path = out / f"{prefix}_{first + first_number}-{first + first_number + len(page) - 1}.png"
        canvas.save(path)
        print(f"wrote {path}")


def count_verdicts(paths: list[str], shown: list[int], where: str) -> None:
    """Each reviewer's counts of clear label errors, ambiguous and correct labels among ``shown``; with two
    reviewers, how many images they judged alike and Cohen's kappa (agreement beyond chance)."""
    names = {"E": "clear label errors", "A": "ambiguous", "C": "correctly labelled", "?": "not judged"}
    seen = []
    for path in paths:
        judged = read_verdicts(path)
        seen.append([judged.get(str(i), "?") for i in shown])
        print(f"by eye ({path}), {where}: "
              + ", ".join(f"{seen[-1].count(k)} {name}" for k, name in names.items() if seen[-1].count(k)))
    if len(seen) == 2:
        both = [(a, b) for a, b in zip(*seen) if "?" not in (a, b)]
        same = sum(a == b for a, b in both)
        kappa = cohen_kappa_score([a for a, _ in both], [b for _, b in both]) if both else float("nan")
        pairs = ", ".join(f"{a}/{b} {n}" for (a, b), n in sorted(Counter(both).items()) if a != b)
        print(f"the two reviewers agree on {same} of {len(both)} images (Cohen's kappa {kappa:.2f}); "
              f"disagreements (first/second): {pairs or 'none'}")


if __name__ == "__main__":
    main()
