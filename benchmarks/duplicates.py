"""Planted near-duplicates: how many edited copies of training images ``cifarlab.duplicates.match`` finds again, and
how often it pairs an image with a different photograph, at its default threshold.

    python benchmarks/duplicates.py --data.root /tmp/cifar10-jpeg --ckpt runs/fast/version_0/checkpoints/last.ckpt
    python benchmarks/duplicates.py ... --n 300 --save-pairs /tmp/dup-pairs   # PNG grids of pairs near the threshold

Originals: ``2 x --n`` training images that have no copy elsewhere in the training set (CIFAR-10's training set holds
some photographs twice; such images are left out, counted, and drawn with ``--save-pairs``). Each original is edited
six ways: shifted by 2-4 pixels (edges repeated or reflected), cropped to 70-90% of its side and enlarged back,
mirrored, recoloured (brightness, contrast, saturation, hue), re-encoded as JPEG at quality 50-75, and all of these
at once. Positives: the copies of the first ``--n`` originals, searched for in the training set, which holds their
original: right when the match is that original and scores at or above the threshold. Negatives: the copies of the
other ``--n`` originals, searched for in the training set without them: any match at or above the threshold is a
false one (their best match is the most similar different photograph). The copies' features come from the network,
as a real query's would. Two other matchers run on the same queries for comparison: a baseline (5 nearest by
features, then 16x16 grey correlation >= 0.90) and cleanlab's ``Datalab`` near-duplicate check at its defaults (on the
same features, one edit kind at a time: the training set and that kind's copies as one data set).
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
import torch
from cleanlab import Datalab
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from cifarlab import duplicates
from cifarlab.audit import cached_features, penultimate_features
from cifarlab.checkpoint import load_classifier
from cifarlab.datasets import DataSource
from cifarlab.precision import cpu_info

BASELINE_CANDIDATES = 5  # the baseline matcher: training images per query, nearest by features
BASELINE_THRESHOLD = 0.90  # the baseline matcher's default: 16x16 grey correlation
POOL = 2.5  # originals drawn per one needed: some have a copy in the training set and are left out
CURVE = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)  # thresholds of the precision/recall summary


# ---------------------------------------------------------------------------------------------- edits
def shift(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Moved by 2-4 pixels in one or both directions, the uncovered border filled by repeating or reflecting."""
    dy, dx = 0, 0
    while max(abs(dy), abs(dx)) < 2:
        dy, dx = rng.integers(-4, 5, 2)
    pad = np.pad(img, ((4, 4), (4, 4), (0, 0)), mode="edge" if rng.random() < 0.5 else "reflect")
    return pad[4 + dy:36 + dy, 4 + dx:36 + dx].copy()


def crop(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A square of 70-90% of the side, anywhere, enlarged back to 32x32 (bicubic)."""
    side = int(round(32 * rng.uniform(0.7, 0.9)))
    y, x = rng.integers(0, 32 - side + 1, 2)
    return np.asarray(Image.fromarray(img[y:y + side, x:x + side]).resize((32, 32), Image.BICUBIC))


def flip(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mirror image."""
    return img[:, ::-1].copy()


def colour(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness and contrast x0.7-1.3, saturation x0.5-1.5, hue turned by up to 36 degrees."""
    t = torch.from_numpy(img).permute(2, 0, 1)
    t = TF.adjust_brightness(t, rng.uniform(0.7, 1.3))
    t = TF.adjust_contrast(t, rng.uniform(0.7, 1.3))
    t = TF.adjust_saturation(t, rng.uniform(0.5, 1.5))
    t = TF.adjust_hue(t, rng.uniform(-0.1, 0.1))
    return t.permute(1, 2, 0).numpy().copy()


def jpeg(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Saved as JPEG at quality 50-75 and decoded."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=int(rng.integers(50, 76)))
    return np.asarray(Image.open(buf).convert("RGB"))


def combined(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A crop or a shift, then mirrored, recoloured and re-encoded."""
    for edit in (crop if rng.random() < 0.5 else shift, flip, colour, jpeg):
        img = edit(img, rng)
    return img


EDITS = {"shift": shift, "crop": crop, "flip": flip, "colour": colour, "jpeg": jpeg, "combined": combined}


# ---------------------------------------------------------------------------------------------- helpers
def baseline_match(query: np.ndarray, base: np.ndarray, query_f: np.ndarray,
                   base_f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The simplest search: the ``BASELINE_CANDIDATES`` nearest by centred cosine of features, scored by the
    correlation of 16x16 grey copies."""
    mean = torch.from_numpy(base_f.mean(0, keepdims=True).astype(np.float32))

    def unit(f):
        return torch.nn.functional.normalize(torch.from_numpy(f.astype(np.float32)) - mean, dim=1)

    def signature(images):
        x = torch.from_numpy(images).float().mean(-1)[:, None]
        x = torch.nn.functional.avg_pool2d(x, 2).flatten(1)
        return torch.nn.functional.normalize(x - x.mean(1, keepdim=True), dim=1)

    b, bs = unit(base_f), signature(base)
    index, score = [], []
    for start in range(0, len(query), 1024):
        near = (unit(query_f[start:start + 1024]) @ b.T).topk(BASELINE_CANDIDATES, 1).indices
        s = (signature(query[start:start + 1024])[:, None] * bs[near]).sum(-1)
        best = s.argmax(1)
        rows = torch.arange(len(near))
        index.append(near[rows, best].numpy())
        score.append(s[rows, best].numpy())
    return np.concatenate(index), np.concatenate(score)


def datalab_match(query_f: np.ndarray, base_f: np.ndarray, kinds: np.ndarray,
                  truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's ``Datalab`` near-duplicate check at its defaults (10 neighbours; a pair is a duplicate when its
    distance is below 0.13 x the median distance to the nearest neighbour), one edit kind at a time so that copies
    of one original never meet: ``(flagged, right)``, right = flagged with its original in the query's set."""
    flagged, right = np.zeros(len(query_f), bool), np.zeros(len(query_f), bool)
    for kind in np.unique(kinds):
        rows = np.flatnonzero(kinds == kind)
        features = np.concatenate([base_f, query_f[rows]]).astype(np.float32)
        lab = Datalab(data={"row": np.arange(len(features))}, verbosity=0)
        lab.find_issues(features=features, issue_types={"near_duplicate": {}})
        sets = lab.get_info("near_duplicate")["near_duplicate_sets"][len(base_f):]
        flagged[rows] = [len(s) > 0 for s in sets]
        right[rows] = [t >= 0 and t in set(s) for s, t in zip(sets, truth[rows])]
    return flagged, right


def rates(right: np.ndarray, positive: np.ndarray, score: np.ndarray, threshold: float) -> tuple[float, float, int]:
    """``(recall, precision, flagged)`` at ``threshold``: recall over the positives, precision over the flagged."""
    flagged = score >= threshold
    hits = (flagged & right).sum()
    return hits / max(1, positive.sum()), hits / max(1, flagged.sum()), int(flagged.sum())


def cpu_line() -> str:
    model, flags = cpu_info()
    fast = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f in (flags or ())]
    return f"CPU: {model}; speed flags: {' '.join(fast) or 'none'}; cores: {os.cpu_count()}; " \
           f"torch threads: {torch.get_num_threads()}"


def save_pairs(path: Path, left: np.ndarray, right: np.ndarray, captions: list[str], title: str) -> None:
    from cifarlab.audit import side_by_side
    from cifarlab.plots import save_image_grid

    if len(left):
        panels = np.stack([side_by_side([a, b], gap=2) for a, b in zip(left, right)])
        save_image_grid(panels, captions, path, cols=6, title=title)
        print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data.root", dest="root", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--n", type=int, default=1000, help="originals with copies in the base, and as many without")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-pairs", dest="save_pairs", type=Path, default=None, help="folder for PNG grids")
    args = parser.parse_args()
    print(cpu_line())
    source = DataSource(args.root)
    train = source.load_split("train").images
    model = load_classifier(args.ckpt)
    train_f = cached_features(model, args.ckpt, train, "train", source.cache_dir)
    rng = np.random.default_rng(args.seed)
    threshold = duplicates.THRESHOLD

    # originals without a copy elsewhere in the training set (searched unedited, outside the pool and within it)
    pool = rng.choice(len(train), int(POOL * 2 * args.n), replace=False)
    rest = np.setdiff1d(np.arange(len(train)), pool)
    started = time.perf_counter()
    out_near, out_score = duplicates.match(train[pool], train[rest], train_f[pool], train_f[rest])
    in_near, in_score = duplicates.match(train[pool], train[pool], train_f[pool], train_f[pool], within=True)
    has_copy = (out_score >= threshold) | (in_score >= threshold)
    clean = pool[~has_copy]
    if len(clean) < 2 * args.n:
        raise SystemExit(f"only {len(clean)} originals without a copy: lower --n")
    print(f"originals: {has_copy.sum()} of {len(pool)} drawn have a copy in the training set at >= {threshold:.2f}"
          f" and are left out ({time.perf_counter() - started:.1f} s)")
    kept, held = clean[:args.n], clean[args.n:2 * args.n]
    base_rows = np.setdiff1d(np.arange(len(train)), held)
    base, base_f = train[base_rows], train_f[base_rows]

    queries, kinds, truth = [], [], []
    for kind, edit in EDITS.items():
        for original, where in zip(np.concatenate([kept, held]),
                                   np.concatenate([np.searchsorted(base_rows, kept), np.full(args.n, -1)])):
            queries.append(edit(train[original], rng))
            kinds.append(kind)
            truth.append(where)
    queries, kinds, truth = np.stack(queries), np.array(kinds), np.array(truth)
    positive = truth >= 0
    started = time.perf_counter()
    query_f = penultimate_features(model, queries)
    feature_time = time.perf_counter() - started
    started = time.perf_counter()
    near, score = duplicates.match(queries, base, query_f, base_f)
    new_time = time.perf_counter() - started
    started = time.perf_counter()
    baseline_near, baseline_score = baseline_match(queries, base, query_f, base_f)
    baseline_time = time.perf_counter() - started
    started = time.perf_counter()
    datalab_flagged, datalab_right = datalab_match(query_f, base_f, kinds, truth)
    datalab_time = time.perf_counter() - started
    right, baseline_right = positive & (near == truth), positive & (baseline_near == truth)

    print(f"\n{len(queries)} queries ({positive.sum()} copies of {args.n} originals in the base, "
          f"{(~positive).sum()} of {args.n} originals not in it) against {len(base)} training images")
    print(f"threshold: cifarlab {threshold:.2f}, baseline {BASELINE_THRESHOLD:.2f}\n")
    print("| edit | recall | precision | baseline recall | baseline precision | Datalab recall | Datalab precision "
          "| right image, any score |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in [*EDITS, "all"]:
        m = np.ones(len(kinds), bool) if kind == "all" else kinds == kind
        r, p, _ = rates(right[m], positive[m], score[m], threshold)
        ro, po, _ = rates(baseline_right[m], positive[m], baseline_score[m], BASELINE_THRESHOLD)
        rd, pd, _ = rates(datalab_right[m], positive[m], datalab_flagged[m].astype(float), 1.0)
        print(f"| {kind} | {r:.1%} | {p:.1%} | {ro:.1%} | {po:.1%} | {rd:.1%} | {pd:.1%} "
              f"| {right[m].sum() / positive[m].sum():.1%} |")
    print("\ncifarlab, all edits: | threshold | recall | precision | flagged | negatives flagged |")
    for t in sorted({*CURVE, threshold}):
        r, p, flagged = rates(right, positive, score, t)
        print(f"| {t:.2f} | {r:.1%} | {p:.1%} | {flagged} | {(score[~positive] >= t).sum()} |")
    neg = np.sort(score[~positive])[::-1]
    print(f"negatives' best scores: max {neg[0]:.3f}, 99th percentile {np.quantile(neg, 0.99):.3f}, "
          f"median {np.median(neg):.3f}; positives' (right image) 1st percentile "
          f"{np.quantile(score[right], 0.01):.3f}")
    print(f"\ntime: features of the {len(queries)} queries {feature_time:.1f} s; cifarlab {new_time:.1f} s "
          f"({len(queries)} x {len(base)}); baseline {baseline_time:.1f} s; Datalab {datalab_time:.1f} s")

    if args.save_pairs:
        args.save_pairs.mkdir(parents=True, exist_ok=True)
        wrong = ~right  # flagged here = a false match
        above = np.flatnonzero(score >= threshold)
        below = np.flatnonzero(score < threshold)
        for name, rows in (("above", above[np.argsort(score[above])][:24]),
                           ("below", below[np.argsort(-score[below])][:24])):
            captions = [f"{score[i]:.3f} {kinds[i]} {'FALSE' if wrong[i] else 'copy'}" for i in rows]
            save_pairs(args.save_pairs / f"planted-{name}.png", queries[rows], base[near[rows]], captions,
                       f"edited copy | its match: the 24 scores just {name} {threshold:.2f}")
        missed = np.flatnonzero(positive & ~(right & (score >= threshold)))[:24]
        save_pairs(args.save_pairs / "planted-missed.png", queries[missed], train[base_rows[truth[missed]]],
                   [f"{score[i]:.3f} {kinds[i]}" for i in missed], "missed copies | their original")
        left_out = np.flatnonzero(has_copy)[:48]
        partner = np.where(out_score[left_out] >= in_score[left_out], rest[out_near[left_out]],
                           pool[in_near[left_out]])
        save_pairs(args.save_pairs / "left-out.png", train[pool[left_out]], train[partner],
                   [f"{max(out_score[i], in_score[i]):.3f}" for i in left_out],
                   "originals left out: the copy the training set already holds")


if __name__ == "__main__":
    from cifarlab.errors import CifarlabError

    try:
        main()
    except CifarlabError as error:  # bad data or flags: one line, as the commands say it
        raise SystemExit(f"{__file__.rsplit('/', 1)[-1]}: error: {error}") from None
