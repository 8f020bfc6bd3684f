"""What is wrong with the data, not only with the model: likely label errors (cleanlab), near-duplicates between
training and test images, a 2-D map of the test set, and two checkpoints compared image by image.

Everything here is arrays in, arrays out (no Gradio): the app and ``cifarlab report`` draw what it returns.
Features are the network's penultimate activations (the input of its last linear layer), computed once per
checkpoint and cached next to the data with the map and the duplicate search (``features-``, ``map-`` and
``copies-<checkpoint key>-....npz``).
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cifarlab import duplicates, precision
from cifarlab.checkpoint import load_classifier
from cifarlab.errors import CifarlabError
from cifarlab.files import atomic_path, file_key, save_npz
from cifarlab.inference import predict_test_set
from cifarlab.metrics import class_accuracy, confusion_matrix
from cifarlab.progress import Report, steps
from cifarlab.transforms import to_batch

FEATURE_BATCH = 250  # images per forward pass when computing features: smaller batches stay in the CPU's caches
PCA_DIMS = 50  # t-SNE runs on the first 50 principal components: the usual denoising step, and 5x less work
# Score (``duplicates.match``) from which two images count as one photograph: checked by eye at, above and below it
# on the JPEG copy, and on a planted benchmark (docs/results.md); the app's slider and `--dup_threshold` change it.
DUPLICATE_SIMILARITY = duplicates.THRESHOLD
# Training images whose mean cosine distance makes the outlier score: cleanlab's default k, enough to be stable for
# a class of 5,000 images and still local.
OUTLIER_NEIGHBOURS = 10
OUTLIER_BATCH = 1024  # query images per similarity matrix: (1024 x 50,000) float32 is 200 MB


# ---------------------------------------------------------------------------------------------- features
@torch.no_grad()
def penultimate_features(model, images: np.ndarray, batch_size: int = FEATURE_BATCH, desc: str | None = None,
                         report: Report | None = None, fp32: bool = False) -> np.ndarray:
    """Features ``(N, D)`` float32 of uint8 images ``(N, 32, 32, 3)``: the input of the network's final ``fc`` layer
    (after global pooling), captured by a forward pre-hook so no network needs a features method. Computed in the
    precision training would pick on this device (bf16 where it is native): they only rank neighbours, and bf16
    moves a feature vector's direction by a cosine of under 5e-4 (docs/results.md, "Audit speed"); ``fp32``: in
    fp32 whatever the device."""
    captured: list[torch.Tensor] = []
    handle = model.net.fc.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].float().cpu()))
    model.eval()
    try:
        with contextlib.nullcontext() if fp32 else precision.autocast(model.device):
            for start in steps(len(images), desc, report, batch_size):
                model(to_batch(images[start:start + batch_size]).to(model.device))
    finally:
        handle.remove()
    return torch.cat(captured).numpy() if captured else np.zeros((0, model.net.fc.in_features), np.float32)


def project_2d(features: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """A 2-D map ``(N, 2)`` float32 of ``features``: t-SNE (scikit-learn, on the first ``PCA_DIMS`` principal
    components) or PCA alone (instant, but classes overlap more)."""
    from sklearn.decomposition import PCA  # the app extra: imported when a map is drawn

    if method not in ("tsne", "pca"):
        raise CifarlabError(f"unknown projection {method!r}: choose tsne or pca")
    x = features.astype(np.float32)
    if method == "pca" or len(x) < 5:
        return PCA(2, random_state=seed).fit_transform(x).astype(np.float32)
    from sklearn.manifold import TSNE  # the app extra

    x = PCA(min(PCA_DIMS, *x.shape), random_state=seed).fit_transform(x)
    perplexity = min(30.0, (len(x) - 1) / 3)  # sklearn requires perplexity < N
    return TSNE(2, init="pca", perplexity=perplexity, random_state=seed,
                n_jobs=os.cpu_count()).fit_transform(x).astype(np.float32)


def nearest_neighbours(query: np.ndarray, base: np.ndarray, k: int = 1,
                       chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``query`` ``(Nq, D)``, the ``k`` most similar rows of ``base`` ``(Nb, D)`` by cosine similarity
    of features centred on ``base``'s mean: ``(index (Nq, k), similarity (Nq, k))``, most similar first.

    Exact search in chunks (10k x 50k x 256 is ~0.1 TFLOP: seconds on a CPU), no index library needed. Centring
    matters: ReLU/GELU features are mostly positive, so uncentred cosines are all close to 1.
    """
    mean = torch.from_numpy(base.mean(0, keepdims=True, dtype=np.float64).astype(np.float32))

    def unit(x):
        return torch.nn.functional.normalize(torch.from_numpy(np.asarray(x, dtype=np.float32)) - mean, dim=1)

    b = unit(base)
    index, similarity = [np.zeros((0, k), np.int64)], [np.zeros((0, k), np.float32)]
    for start in range(0, len(query), chunk):
        best = (unit(query[start:start + chunk]) @ b.T).topk(min(k, len(b)), dim=1)  # of (chunk, Nb) cosines
        index.append(best.indices.numpy())
        similarity.append(best.values.numpy())
    return np.concatenate(index).astype(np.int64), np.concatenate(similarity).astype(np.float32)


def match_duplicates(test_images: np.ndarray, train_images: np.ndarray | None, test_features: np.ndarray,
                     train_features: np.ndarray | None, report: Report | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each test image's likeliest duplicate in the training set (``None``: among the other test images) and its
    score: ``(nearest (N,), similarity (N,))``; ``duplicates.match`` finds copies that were shifted, cropped, mirrored,
    recoloured or re-encoded, from the network's features and the images' edges."""
    within = train_images is None
    base_images, base_features = (test_images, test_features) if within else (train_images, train_features)
    return duplicates.match(test_images, base_images, test_features, base_features, within=within, report=report)


def _cached(path: Path, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()``, saved once at ``path`` (array ``key``) and read from there afterwards."""
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return z[key]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # damaged: computed again
    value = compute()
    save_npz(path, **{key: value})
    return value


def features_key(model, ckpt_path: str | Path) -> str:
    """The cache-name key of a checkpoint's features and of all computed from them: the checkpoint file and the
    precision features are computed in on the model's device (a cache folder may be shared by two machines)."""
    return f"{file_key(ckpt_path)}-{precision.choose_precision(torch.device(model.device).type).precision}"


def cached_features(model, ckpt_path: str | Path, images: np.ndarray, split: str, cache_dir: Path,
                    report: Report | None = None) -> np.ndarray:
    """``penultimate_features`` of a split, computed once per checkpoint file and cached in ``cache_dir``."""
    path = Path(cache_dir) / f"features-{features_key(model, ckpt_path)}-{split}-{len(images)}.npz"
    desc = f"features of {len(images)} {split} images (once per checkpoint)"
    feats = _cached(path, "features", lambda: penultimate_features(model, images, desc=desc, report=report)
                    .astype(np.float16))
    return feats.astype(np.float32)


def cached_map(features: np.ndarray, key: str, projection: str, cache_dir: Path) -> np.ndarray:
    """``project_2d`` of a checkpoint's test features (``features_key``), computed once and cached in ``cache_dir``."""
    path = Path(cache_dir) / f"map-{key}-{projection}-{len(features)}.npz"

    def compute():
        print(f"projecting {len(features)} test images to 2-D ({projection}, once per checkpoint) ...", flush=True)
        return project_2d(features, projection)

    return _cached(path, "map2d", compute)


def cached_duplicates(test_images: np.ndarray, train_images: np.ndarray | None, test_features: np.ndarray,
                      train_features: np.ndarray | None, key: str, cache_dir: Path,
                      report: Report | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``match_duplicates``, computed once per checkpoint's features (``features_key``) and cached in ``cache_dir``."""
    against = "within" if train_images is None else len(train_images)
    path = Path(cache_dir) / f"copies-{key}-{len(test_images)}-{against}.npz"
    pairs = _cached(path, "pairs", lambda: np.stack([a.astype(np.float64) for a in match_duplicates(
        test_images, train_images, test_features, train_features, report)]))
    return pairs[0].astype(np.int64), pairs[1].astype(np.float32)


# ---------------------------------------------------------------------------------------------- images of no class
def outlier_scores(train_features: np.ndarray, test_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's out-of-distribution scores in [0, 1] (low = unlike the training set) of the training images (each
    against the others) and of the test images, from the network's features: the mean cosine distance to the
    ``OUTLIER_NEIGHBOURS`` nearest training images, turned into a score by ``cleanlab.outlier``'s own functions,
    as ``OutOfDistribution`` does (a test keeps them equal to 1e-5). The neighbours come from one matrix product per
    batch instead of the scikit-learn search OutOfDistribution runs: 9x less time (docs/results.md, "Audit speed").
    Features are centred on the training mean first, as for the duplicate search (uncentred ReLU features all have
    cosines near 1)."""
    from cleanlab.outlier import correct_precision_errors, transform_distances_to_scores  # the app extra

    if len(train_features) < 2:
        raise CifarlabError(f"outlier scores need at least 2 training images, not {len(train_features)}: "
                            "add training images to the data folder")
    mean = torch.from_numpy(train_features.mean(0, keepdims=True, dtype=np.float64).astype(np.float32))
    k = max(1, min(OUTLIER_NEIGHBOURS, len(train_features) - 1))
    base = duplicates.centred_unit(train_features, mean)
    train = _mean_knn_distance(base, base, k, exclude_self=True)
    test = _mean_knn_distance(duplicates.centred_unit(test_features, mean), base, k, exclude_self=False)
    scale = float(max(np.median(train), 100 * np.finfo(np.float64).eps))  # OutOfDistribution's scaling_factor

    def score(distances: np.ndarray) -> np.ndarray:
        scores = transform_distances_to_scores(distances, t=1, scaling_factor=scale)
        return correct_precision_errors(scores, distances, "cosine").astype(np.float32)

    return score(train), score(test)


def _mean_knn_distance(query: torch.Tensor, base: torch.Tensor, k: int, exclude_self: bool) -> np.ndarray:
    """``(Q,)`` float64: each unit row of ``query``'s mean cosine distance to its ``k`` nearest unit rows of ``base``,
    itself left out (``exclude_self``: the query is the base)."""
    out = []
    for start in range(0, len(query), OUTLIER_BATCH):
        similarity = query[start:start + OUTLIER_BATCH] @ base.T  # (batch, N_base)
        if exclude_self:
            own = torch.arange(len(similarity))
            similarity[own, own + start] = -2.0
        top = similarity.topk(k, 1).values.double()
        out.append((1.0 - top).clamp_min(0.0).mean(1))
    return torch.cat(out).numpy() if out else np.zeros(0)


# ---------------------------------------------------------------------------------------------- label errors
@dataclass
class LabelIssues:
    """cleanlab's view of one split: ``quality`` (N,) in [0, 1] (low = the given label is likely wrong),
    ``flagged`` the indices cleanlab finds mislabeled, most likely first, ``suggested`` (N,) the model's label."""

    quality: np.ndarray
    flagged: np.ndarray
    suggested: np.ndarray


def label_issues(labels: np.ndarray, probs: np.ndarray) -> LabelIssues:
    """Likely label errors from out-of-sample probabilities ``probs`` (N, K) and given ``labels`` (N,):
    ``cleanlab.filter.find_label_issues`` (confident learning, pruned by noise rate) ranked by
    ``cleanlab.rank.get_label_quality_scores`` (self-confidence: the probability of the given label)."""
    from cleanlab.filter import find_label_issues  # the app extra: imported when an audit runs
    from cleanlab.rank import get_label_quality_scores  # the app extra

    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float32)
    probs = probs / probs.sum(1, keepdims=True)  # float16 files: cleanlab checks rows sum to 1
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    if len(np.unique(labels)) < probs.shape[1]:  # cleanlab needs every class present; a tiny set may lack one
        flagged = np.flatnonzero(probs.argmax(1) != labels)
        flagged = flagged[np.argsort(quality[flagged], kind="stable")]
    else:
        flagged = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    return LabelIssues(quality.astype(np.float32), np.asarray(flagged, dtype=np.int64), probs.argmax(1))


def accuracy(preds: np.ndarray, labels: np.ndarray, keep: np.ndarray | None = None) -> float:
    """Fraction of ``preds == labels``, over the images where ``keep`` (a boolean mask) is True."""
    right = np.asarray(preds) == np.asarray(labels)
    if keep is not None:
        right = right[keep]
    return float(right.mean()) if len(right) else float("nan")


def per_class_accuracy(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy ``(K,)`` of each true class (0 for a class with no images)."""
    return class_accuracy(confusion_matrix(preds, labels, num_classes))


# ---------------------------------------------------------------------------------------------- two runs
@dataclass
class Comparison:
    """Two checkpoints' predictions on the same test images: where only A is right, where only B is right
    (each most confident first: the surest fixes and breakages), and per-class accuracy of both."""

    only_a: np.ndarray
    only_b: np.ndarray
    per_class_a: np.ndarray
    per_class_b: np.ndarray
    acc_a: float
    acc_b: float


def check_same_classes(classes_a: list[str], classes_b: list[str], name_a: str = "A", name_b: str = "B") -> None:
    """One-line error unless two checkpoints (named ``name_a``, ``name_b`` in it) classify the same classes."""
    if list(classes_a) != list(classes_b):
        raise CifarlabError(f"{name_b} classifies {', '.join(classes_b)}, but {name_a} classifies "
                            f"{', '.join(classes_a)}: different classes; compare checkpoints trained on the same "
                            "classes")


def load_ensemble(paths: list[str | Path], classes: list[str], first: str | Path) -> list[tuple[Path, object]]:
    """The checkpoints ``paths`` that join ``first`` in an ensemble, as ``(path, model)``: read before any slow
    work, so a missing file or another class list fails at once."""
    members = []
    for path in paths:
        model = load_classifier(path)
        check_same_classes(classes, list(model.class_names), f"--ckpt {first}", f"the ensemble's {path}")
        members.append((Path(path), model))
    return members


def compare_runs(probs_a: np.ndarray, probs_b: np.ndarray, labels: np.ndarray, classes_a: list[str],
                 classes_b: list[str]) -> Comparison:
    """Compare two checkpoints' test probabilities ``(N, K)``; their class lists must be the same."""
    check_same_classes(classes_a, classes_b)
    if probs_a.shape != probs_b.shape:
        raise CifarlabError(f"the two checkpoints were evaluated on different test sets ({len(probs_a)} vs "
                            f"{len(probs_b)} images): pass the same --data.root for both")
    pa, pb = probs_a.argmax(1), probs_b.argmax(1)
    right_a, right_b = pa == labels, pb == labels
    only_a = np.flatnonzero(right_a & ~right_b)
    only_b = np.flatnonzero(right_b & ~right_a)
    only_a = only_a[np.argsort(-probs_b[only_a].max(1), kind="stable")]  # B surest of its wrong answer first
    only_b = only_b[np.argsort(-probs_a[only_b].max(1), kind="stable")]
    k = len(classes_a)
    return Comparison(only_a, only_b, per_class_accuracy(pa, labels, k), per_class_accuracy(pb, labels, k),
                      float(right_a.mean()), float(right_b.mean()))


def side_by_side(panels: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Equal-height ``(H, W, 3)`` uint8 panels in one row, separated by ``gap`` white pixels."""
    height = panels[0].shape[0]
    spacer = np.full((height, gap, 3), 255, np.uint8)
    row = []
    for i, panel in enumerate(panels):
        if i:
            row.append(spacer)
        row.append(panel)
    return np.concatenate(row, axis=1)


# ---------------------------------------------------------------------------------------------- training-set OOF
def find_train_oof(cache_dir: Path, labels: np.ndarray, classes: list[str]) -> tuple[Path, dict] | None:
    """The newest ``train-oof-*.npz`` in ``cache_dir`` made for exactly these training ``labels`` and ``classes``, as
    ``(path, arrays)`` (keys as ``write_train_oof`` writes them); ``None`` when there is none."""
    files = sorted(Path(cache_dir).glob("train-oof-*.npz"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            same = (list(data["classes"]) == list(classes) and np.array_equal(data["labels"], labels)
                    and data["probs"].shape == (len(labels), len(classes)))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            continue  # damaged or foreign: the app must start anyway
        if same:
            return path, data
    return None


def write_train_oof(cache_dir: Path, recipe: str, probs: np.ndarray, labels: np.ndarray, fold: np.ndarray,
                    classes: list[str], ckpt_paths: list[Path]) -> Path:
    """Write ``<cache_dir>/train-oof-<recipe>-k<K>-<N>.npz``: ``probs`` (N, C) float16 out-of-sample probabilities,
    ``labels`` (N,) int64, ``fold`` (N,) int64 (the fold each image was held out in), ``classes`` (C,) str, ``recipe``
    str, ``folds`` int, ``ckpt_paths`` (K,) str (fold k's model). Rows are the training split in the order of
    ``DataSource.load_split("train")``."""
    folds = len(ckpt_paths)
    out = Path(cache_dir) / f"train-oof-{recipe}-k{folds}-{len(labels)}.npz"
    with atomic_path(out, suffix=".tmp") as tmp, open(tmp, "wb") as file:  # not matched by find_train_oof meanwhile
        np.savez(file, probs=probs.astype(np.float16), labels=labels.astype(np.int64), fold=fold.astype(np.int64),
                 classes=np.array(classes, dtype=str), recipe=np.array(recipe), folds=np.array(folds),
                 ckpt_paths=np.array([str(p) for p in ckpt_paths], dtype=str))
    return out


# ---------------------------------------------------------------------------------------------- one bundle
@dataclass
class DataAudit:
    """Everything the data tabs of the app and the report show for one checkpoint, filled step by step (``steps``,
    in the order the tabs need them; ``run`` does them all): cleanlab's label issues of the test split and, once
    ``cifarlab audit`` has run, of the training split; the test features and their 2-D map; the outlier scores of
    both splits; near-duplicates against the training set and within the test set."""

    model: object
    ckpt_path: Path
    test: object  # inference.Predictions
    data: object  # datasets.DataSource
    projection: str = "tsne"
    train_images: np.ndarray | None = None  # (N_train, 32, 32, 3) uint8
    train_labels: np.ndarray | None = None  # (N_train,) int64
    train_probs: np.ndarray | None = None  # (N_train, K) out-of-sample, from `cifarlab audit`
    train_source: str = ""  # the file they came from, and how
    issues: dict[str, LabelIssues] = field(default_factory=dict)
    test_features: np.ndarray | None = None  # (N, D)
    map2d: np.ndarray | None = None  # (N, 2)
    nearest: np.ndarray | None = None  # (N,) index of each test image's likeliest training duplicate
    similarity: np.ndarray | None = None  # (N,) its score (``match_duplicates``)
    train_features: np.ndarray | None = None  # (N_train, D)
    test_nearest: np.ndarray | None = None  # (N,) each test image's likeliest duplicate among the other test images
    test_similarity: np.ndarray | None = None  # (N,) its score
    outliers: dict[str, np.ndarray] = field(default_factory=dict)  # split -> (N,) cleanlab's OOD score, low = odd
    ensemble: list[tuple[Path, object]] = field(default_factory=list)  # more (checkpoint, model): ``load_ensemble``
    test_probs: np.ndarray | None = None  # (N, K) the probabilities the test split's label ranking uses
    test_source: str = ""  # which, in words

    def steps(self) -> list[tuple[str, str, Callable[[Report | None], None]]]:
        """``(key, what it computes, step(report))`` in order; each fills fields the next ones and the tabs read."""
        ranking = f" (the mean of {len(self.ensemble) + 1} checkpoints' predictions)" if self.ensemble else ""
        return [("issues", f"likely label errors{ranking}", self.find_label_issues),
                ("features", "features of the test set", self.find_test_features),
                ("map", f"embedding map ({self.projection})", self.find_map),
                ("outliers", "features of the training set and outlier scores (images of no class)",
                 self.find_outliers),
                ("duplicates", "the duplicate searches", self.find_duplicates)]

    def run(self) -> DataAudit:
        for _, _, step in self.steps():
            step(None)
        return self

    @property
    def cache_dir(self) -> Path:
        return self.data.cache_dir

    def find_label_issues(self, report: Report | None = None) -> None:
        train = self.data.load_split("train")
        self.train_images, self.train_labels = train.images, np.asarray(train.labels, dtype=np.int64)
        self.test_probs, self.test_source = self.ensemble_probs(report)
        issues = {"test": label_issues(self.test.labels, self.test_probs)}
        found = find_train_oof(self.cache_dir, self.train_labels, list(self.model.class_names))
        if found is not None:
            path, data = found
            self.train_probs = np.asarray(data["probs"], dtype=np.float32)
            issues["train"] = label_issues(self.train_labels, self.train_probs)
            self.train_source = f"{int(data['folds'])}-fold cross-validation of {str(data['recipe'])} ({path.name})"
        self.issues = issues

    def ensemble_probs(self, report: Report | None = None) -> tuple[np.ndarray, str]:
        """The test probabilities the label ranking uses, and which they are: this checkpoint's, or their mean over
        it and the ``ensemble`` (out-of-sample for the test set in every member; the mean is better calibrated and
        less tied to one run's mistakes, which cleanlab's ranking relies on)."""
        if not self.ensemble:
            return self.test.probs, f"this checkpoint's test probabilities ({self.ckpt_path.name})"
        probs = [self.test.probs]
        for path, model in self.ensemble:
            probs.append(predict_test_set(model, path, self.data, report=report).probs)
        names = ", ".join(str(p) for p in [self.ckpt_path, *(path for path, _ in self.ensemble)])
        return (np.mean(probs, axis=0).astype(np.float32),
                f"the mean test probabilities of {len(probs)} checkpoints ({names}; ensemble accuracy "
                f"{accuracy(np.mean(probs, axis=0).argmax(1), self.test.labels):.2%})")

    def find_test_features(self, report: Report | None = None) -> None:
        self.test_features = cached_features(self.model, self.ckpt_path, self.test.images, "test", self.cache_dir,
                                             report)

    def find_map(self, report: Report | None = None) -> None:
        self.map2d = cached_map(self.test_features, features_key(self.model, self.ckpt_path), self.projection,
                                self.cache_dir)

    def find_train_features(self, report: Report | None = None) -> None:
        if self.train_features is None:
            self.train_features = cached_features(self.model, self.ckpt_path, self.train_images, "train",
                                                  self.cache_dir, report)

    def find_outliers(self, report: Report | None = None) -> None:
        self.find_train_features(report)
        path = Path(self.cache_dir) / (f"outliers-{features_key(self.model, self.ckpt_path)}-"
                                       f"{len(self.test_features)}-{len(self.train_features)}.npz")
        scores = _cached(path, "scores", lambda: np.concatenate(
            outlier_scores(self.train_features, self.test_features)))
        n_train = len(self.train_features)
        self.outliers = {"test": scores[n_train:], "train": scores[:n_train]}

    def find_duplicates(self, report: Report | None = None) -> None:
        self.find_train_features(report)
        key = features_key(self.model, self.ckpt_path)
        self.nearest, self.similarity = cached_duplicates(self.test.images, self.train_images, self.test_features,
                                                          self.train_features, key, self.cache_dir, report)
        self.test_nearest, self.test_similarity = cached_duplicates(self.test.images, None, self.test_features, None,
                                                                    key, self.cache_dir, report)

    def most_unusual(self, split: str = "test") -> np.ndarray:
        """Indices of ``split``, least like the training set first (lowest outlier score)."""
        return np.argsort(self.outliers[split], kind="stable")

    def duplicates(self, threshold: float = DUPLICATE_SIMILARITY) -> np.ndarray:
        """Test indices with a training near-duplicate at ``threshold`` or above, most similar first."""
        found = np.flatnonzero(self.similarity >= threshold)
        return found[np.argsort(-self.similarity[found], kind="stable")]

    def test_pairs(self, threshold: float = DUPLICATE_SIMILARITY) -> tuple[np.ndarray, np.ndarray]:
        """Pairs ``(P, 2)`` of test images that are near-duplicates of each other at ``threshold`` or above, each
        pair once (the lower index first), most similar first, and their similarities ``(P,)``."""
        best: dict[tuple[int, int], float] = {}
        for i in np.flatnonzero(self.test_similarity >= threshold):
            pair = tuple(sorted((int(i), int(self.test_nearest[i]))))
            best[pair] = max(best.get(pair, -1.0), float(self.test_similarity[i]))
        order = sorted(best, key=lambda pair: -best[pair])
        return np.array(order, np.int64).reshape(-1, 2), np.array([best[pair] for pair in order], np.float32)
