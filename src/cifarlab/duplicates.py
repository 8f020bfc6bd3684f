"""Near-duplicates: the same photograph in two sets of 32x32 images, found again after a shift of a few pixels, a
crop and rescale, a mirror, a change of colour or contrast or JPEG re-encoding, and told apart from a different
object on the same background.

Two steps. Candidates: for each query image, the base images nearest by the network's features, and those nearest
by where their edges run (``edge_histograms``, tried on the query, its mirror and zoomed views): the network's
features rank a mirrored or cropped copy far down. Score: the best normalized correlation of the two images'
band-passed grey levels over shifts, zooms (either image may be a crop of the other) and the mirror, at 16x16 for
every candidate and at 32x32 for the best two (``pair_scores``). Band-passed, because the smooth shading of a sky or
a sea correlates between any two photographs of it; and divided by the local contrast (``_even_contrast``), because
a horizon's strong edge would otherwise outweigh the boat on it. What is left correlates only in a copy.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from cifarlab.progress import Report

SIZE = 32  # pixels: the side of the images compared (CIFAR's)
LUMA = (0.299, 0.587, 0.114)  # grey = this mix of R, G, B (ITU-R BT.601): edges survive a change of hue
SHIFT = 4  # pixels (of 32): how far a copy may be moved in each direction
# One image a crop of the other, enlarged by this factor: 1.45 = a crop to 69% of the side. Steps of ~3.5%, so a zoom
# in between is off by <2%, a quarter of a pixel at the edge of the 24-pixel window compared; the 16x16 search takes
# every other one (a pixel there is two).
ZOOMS = (1.0, 1.035, 1.07, 1.105, 1.14, 1.18, 1.23, 1.28, 1.33, 1.39, 1.45, 1.5)
BAND = (0.8, 3.0)  # pixels (of 32): Gaussian sigmas of the band-pass; the lower one also forgives half-pixel offsets
CONTRAST_SIGMA = 4.0  # pixels (of 32): the neighbourhood whose contrast each pixel's is divided by
CONTRAST_FLOOR = 4.0  # grey levels (of 255) of band-passed contrast: weaker is noise or JPEG blocks, not detail
COARSE = 16  # pixels: the side at which every candidate is scored
FINE_CANDIDATES = 2  # best coarse candidates per query scored again at full size
FEATURE_CANDIDATES = 16  # base images per query nearest by the network's features
EDGE_CANDIDATES = 32  # base images per query nearest by edge histograms (any view)
# Edge histograms: 12 directions (30 degrees each) on a 4x4 grid of 8x8-pixel cells, from a 16x16 grey copy.
HISTOGRAM_BINS = 12
HISTOGRAM_CELLS = 4
HISTOGRAM_SIZE = 16  # pixels: halving first keeps JPEG noise out of the gradients
HISTOGRAM_BLUR = 1.5  # pixels (of 16): cells overlap, so an edge moved across a cell border counts in both
HISTOGRAM_SHARPNESS = 4  # a gradient votes cos(angle to the bin)^4: half its vote 33 degrees off
# Base views (zoom, dy, dx): the whole image, and crops of it enlarged (centred and moved by 3 pixels diagonally),
# for a query that is a crop of it; edge histograms tolerate a few pixels' offset, not a change of scale.
HISTOGRAM_VIEWS = ((1.0, 0, 0), (1.15, 0, 0), (1.3, 0, 0), (1.45, 0, 0), (1.3, -3, -3), (1.3, -3, 3), (1.3, 3, -3),
                   (1.3, 3, 3))
QUERY_BATCH = 512  # query images searched at once: (512 x 50,000) similarities are 100 MB
PAIR_BATCH = 2048  # candidate pairs scored at once at 16x16 (~0.2 GB of windows), a quarter as many at 32x32
# Score at or above which two images are the same photograph: the correlation after the best alignment. Planted edited
# copies score 0.94-1 (1st percentile 0.937, benchmarks/duplicates.py); two different photographs of a silhouette on
# a plain sky (a plane, a ship on the horizon) reach 0.90-0.93.
THRESHOLD = 0.92

_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8  # grey levels per pixel


# ---------------------------------------------------------------------------------------------- images
def grey(images: np.ndarray) -> torch.Tensor:
    """Grey levels ``(N, 1, H, W)`` float32 of uint8 images ``(N, H, W, 3)``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    return (x @ torch.tensor(LUMA))[:, None]


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, C, H, W)`` resampled to ``size x size`` (bilinear, antialiased when shrinking)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each channel of ``x`` ``(N, C, H, W)`` blurred by a Gaussian of ``sigma`` pixels (edges repeated)."""
    radius = int(np.ceil(2.5 * sigma))
    kernel = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).view(1, 1, 1, -1)
    n, c, h, w = x.shape
    x = x.reshape(n * c, 1, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.transpose(2, 3))
    return x.view(n, c, h, w)


def band(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` band-passed: blurred by ``BAND[0]`` minus blurred by ``BAND[1]``, in pixels of 32 times ``scale``."""
    return blur(x, BAND[0] * scale) - blur(x, BAND[1] * scale)


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``(..., D)`` less their mean, scaled to length 1: the dot product of two is their correlation."""
    x = x - x.mean(-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


@functools.cache
def _linear(name: str, side: int, *args) -> torch.Tensor:
    """``(side * side, D)``: the linear map ``_MAPS[name](grey image side x side, *args)`` as a matrix, so that a
    batch of images is one matrix product (small convolutions on 32x32 images cost more in overhead than in
    arithmetic)."""
    eye = torch.eye(side * side).view(-1, 1, side, side)
    return _MAPS[name](eye, *args).flatten(1)


def _gradient_view(x: torch.Tensor, zoom: float, dy: int, dx: int) -> torch.Tensor:
    """Sobel gradients ``(N, 2, 16, 16)`` of the ``1/zoom`` crop of ``x`` ``(N, 1, 32, 32)`` whose centre is moved
    by ``(dy, dx)`` pixels, shrunk to 16x16."""
    side = round(SIZE / zoom)
    top, left = (SIZE - side) // 2 + dy, (SIZE - side) // 2 + dx
    x = resize(x[..., top:top + side, left:left + side], HISTOGRAM_SIZE)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), torch.stack([_SOBEL, _SOBEL.T])[:, None])


def _band_view(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` ``(N, 1, s, s)`` at ``size`` pixels, band-passed."""
    return band(resize(x, size), size / SIZE)


def _templates(x: torch.Tensor, size: int) -> torch.Tensor:
    """For each of ``_zooms(size)``: ``x`` ``(N, 1, s, s)`` shrunk by it (to a side of ``size / zoom`` pixels) and
    band-passed, flattened and concatenated ``(N, sum of sides**2)``."""
    return torch.cat([band(resize(x, round(size / zoom)), size / SIZE).flatten(1) for zoom in _zooms(size)], 1)


@functools.cache
def _gaussian_matrix(side: int, sigma: float) -> torch.Tensor:
    """``(side, side)``: a Gaussian blur of ``sigma`` pixels along one axis, each row summing to 1 (no padding)."""
    at = torch.arange(side, dtype=torch.float32)
    g = torch.exp(-(at[:, None] - at[None]) ** 2 / (2 * sigma ** 2))
    return g / g.sum(1, keepdim=True)


def _even_contrast(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Band-passed maps ``(N, s, s)`` divided by their local contrast (RMS within ``CONTRAST_SIGMA``), floored at
    ``CONTRAST_FLOOR``: a horizon's long, strong edge then weighs no more than a ship's faint ones, so two photographs
    that share only a horizon no longer correlate; flat areas (below the floor) stay near 0."""
    g = _gaussian_matrix(maps.shape[-1], CONTRAST_SIGMA * size / SIZE)
    energy = g @ maps.square() @ g.T
    return maps / (energy + CONTRAST_FLOOR ** 2).sqrt()


_MAPS = {"gradients": _gradient_view, "band": _band_view, "templates": _templates, "shrink": resize}


def _zooms(size: int) -> tuple[float, ...]:
    """The zooms tried at ``size`` pixels: all of ``ZOOMS`` at full size, every other one below."""
    return ZOOMS if size >= SIZE else ZOOMS[::2]


def _side(size: int, zoom: float) -> int:
    """Side of the template of an image shrunk by ``zoom``, at ``size`` pixels: the centre that stays inside the
    other image after a shift of ``SHIFT``, or for a smaller image the side of the smallest (two sizes of window
    to compare with, not one per zoom)."""
    largest = size - 2 * round(SHIFT * size / SIZE)
    return largest if round(size / zoom) >= largest else round(size / max(_zooms(size)))


# ---------------------------------------------------------------------------------------------- candidates
@functools.cache
def _pooling() -> torch.Tensor:
    """``(16 * 16, 4 * 4)``: the linear map from a 16x16 map to its blurred 4x4 grid of cells."""
    eye = torch.eye(HISTOGRAM_SIZE ** 2).view(-1, 1, HISTOGRAM_SIZE, HISTOGRAM_SIZE)
    return resize(blur(eye, HISTOGRAM_BLUR), HISTOGRAM_CELLS).flatten(1)


def edge_histograms(images: np.ndarray, views: tuple[tuple[float, int, int], ...] = ((1.0, 0, 0),),
                    mirror: bool = False) -> list[torch.Tensor]:
    """For each crop ``(zoom, dy, dx)`` in ``views`` (see ``_gradient_view``) of each image or its mirror: unit
    vectors ``(N, 192)`` bfloat16, for each cell of a 4x4 grid how much edge runs in each of 12 directions,
    square-rooted so that one strong edge does not drown the rest. Their dot product finds copies after shifts,
    colour changes and re-encoding."""
    angles = torch.arange(HISTOGRAM_BINS) * (2 * torch.pi / HISTOGRAM_BINS)
    directions = torch.stack([angles.cos(), angles.sin()])  # (2, 12)
    gradients = torch.cat([_linear("gradients", SIZE, *view) for view in views], 1)
    out: list[list[torch.Tensor]] = [[] for _ in views]
    for start in range(0, len(images), PAIR_BATCH):
        x = grey(images[start:start + PAIR_BATCH])
        x = x.flip(-1) if mirror else x
        g = (x.flatten(1) @ gradients).view(len(x), len(views), 2, -1).transpose(2, 3)  # (n, views, 256, 2)
        strength = g.square().sum(3, keepdim=True).sqrt_().clamp_min_(1e-6)
        votes = (g @ directions).div_(strength).clamp_min_(0).pow_(HISTOGRAM_SHARPNESS).mul_(strength)
        cells = (votes.transpose(2, 3) @ _pooling()).flatten(2)  # (n, views, 12 * 16)
        cells = F.normalize(cells.clamp_min(0).sqrt(), dim=2).bfloat16()
        for v in range(len(views)):
            out[v].append(cells[:, v])
    size = HISTOGRAM_BINS * HISTOGRAM_CELLS ** 2
    return [torch.cat(o) if o else torch.zeros(0, size, dtype=torch.bfloat16) for o in out]


def centred_unit(x: np.ndarray, mean: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``(N, D)`` less ``mean`` ``(1, D)``, scaled to length 1: their dot products are cosines."""
    return F.normalize(torch.from_numpy(np.asarray(x, dtype=np.float32)) - mean, dim=1)


def candidates(query_images: np.ndarray, base_images: np.ndarray, query_features: np.ndarray,
               base_features: np.ndarray, within: bool = False) -> np.ndarray:
    """Indices ``(Q, FEATURE_CANDIDATES + EDGE_CANDIDATES)`` into the base of each query's candidates, -1 where one
    is found twice (and, ``within``, for the query itself)."""
    mean = torch.from_numpy(base_features.mean(0, keepdims=True, dtype=np.float64).astype(np.float32))
    base_f = centred_unit(base_features, mean)
    base_views = edge_histograms(base_images, HISTOGRAM_VIEWS)
    query_views = [edge_histograms(query_images, mirror=mirror)[0] for mirror in (False, True)]
    k_features, k_edges = min(FEATURE_CANDIDATES, len(base_f)), min(EDGE_CANDIDATES, len(base_f))
    found = []
    for start in range(0, len(query_images), QUERY_BATCH):
        rows = slice(start, start + QUERY_BATCH)
        by_features = centred_unit(query_features[rows], mean) @ base_f.T
        by_edges = None
        for q in query_views:
            for b in base_views:
                s = q[rows] @ b.T
                by_edges = s if by_edges is None else torch.maximum(by_edges, s)
        if within:  # not the query itself
            own = torch.arange(len(by_features))
            by_features[own, own + start] = -2.0
            by_edges[own, own + start] = -2.0
        found.append(torch.cat([by_features.topk(k_features, 1).indices, by_edges.topk(k_edges, 1).indices], 1))
    index = np.sort(torch.cat(found).numpy(), 1)
    index[:, 1:][index[:, 1:] == index[:, :-1]] = -1  # each candidate once
    if within:  # a base smaller than the candidates asked for yields the query itself too
        index[index == np.arange(len(index))[:, None]] = -1
    return index


# ---------------------------------------------------------------------------------------------- scoring
def _query_side(images: torch.Tensor, size: int) -> tuple[dict, dict]:
    """Templates ``{t: (N, 2 * M, t * t)}`` and windows ``{t: (N, 2 * P, t * t)}`` of grey images ``(N, 1, 32, 32)``
    and their mirrors (see ``_base_side``)."""
    plain, mirrored = _base_side(images, size), _base_side(images.flip(-1), size)
    windows = {t: tuple(torch.cat([a, b], 1) for a, b in zip(plain[1][t], mirrored[1][t])) for t in plain[1]}
    return {t: torch.cat([plain[0][t], mirrored[0][t]], 1) for t in plain[0]}, windows


def _base_side(images: torch.Tensor, size: int) -> tuple[dict, dict]:
    """What an image is compared on, for grey images ``(N, 1, 32, 32)`` at ``size`` pixels: ``templates``
    ``{t: (N, M, t * t)}``, the image shrunk by each of ``ZOOMS``, band-passed, its central ``t x t`` (unit vectors);
    ``windows`` ``{t: (N, P, t * t)}``, every ``t x t`` window of the image band-passed (unit vectors). A template
    that correlates with a window of the other image is that image, moved or cropped."""
    x = images.flatten(1)
    if size != SIZE:  # shrink once, then work on size x size pixels (16x16: 4 times fewer)
        x = x @ _linear("shrink", SIZE, size)
    flat = x @ _linear("templates", size, size)
    whole = _even_contrast((x @ _linear("band", size, size)).view(len(x), size, size), size)
    templates, windows, start = {}, {}, 0
    for zoom in _zooms(size):
        side, t = round(size / zoom), _side(size, zoom)
        shrunk = _even_contrast(flat[:, start:start + side * side].view(len(x), side, side), size)
        first = (side - t) // 2
        templates.setdefault(t, []).append(shrunk[:, first:first + t, first:first + t].flatten(1))
        start += side * side
    for t in templates:
        templates[t] = unit(torch.stack(templates[t], 1))
        view = whole.unfold(1, t, 1).unfold(2, t, 1).reshape(len(x), -1, t * t)
        # a zero-mean template's dot product ignores a window's mean: only its spread is needed
        spread = (_window_sums(whole.square(), t) - _window_sums(whole, t).square() / (t * t)).clamp_min(1e-6).sqrt()
        windows[t] = (view, spread)
    return templates, windows


def _window_sums(maps: torch.Tensor, t: int) -> torch.Tensor:
    """``(N, P)``: the sum of every ``t x t`` window of ``maps`` ``(N, s, s)``, in the order of ``unfold``."""
    c = F.pad(maps.cumsum(1).cumsum(2), (1, 0, 1, 0))
    return (c[:, t:, t:] - c[:, :-t, t:] - c[:, t:, :-t] + c[:, :-t, :-t]).flatten(1)


def pair_scores(query_images: np.ndarray, base_images: np.ndarray, index: np.ndarray, size: int = SIZE,
                report: Report | None = None) -> np.ndarray:
    """Scores ``(Q, K)`` in [-1, 1] of each query image with each of its candidates ``index`` ``(Q, K)`` (into
    ``base_images``; -1 = none, scored -1): the best correlation of band-passed grey levels over every shift, zoom
    and mirror, at ``size`` pixels. 1 = the same photograph, up to brightness and contrast."""
    q_count, k = index.shape
    scores = torch.full((q_count, k), -1.0)
    per_batch = max(1, PAIR_BATCH * COARSE ** 2 // size ** 2 // max(k, 1))
    for start in range(0, q_count, per_batch):
        rows = slice(start, min(q_count, start + per_batch))
        pick = index[rows]
        n = len(pick)
        q_templates, q_windows = _query_side(grey(query_images[rows]), size)
        b_templates, b_windows = _base_side(grey(base_images[np.maximum(pick, 0).reshape(-1)]), size)
        best = torch.full((n, k), -1.0)
        for t in q_templates:
            # the query moved, cropped or mirrored within the candidate, and the candidate within the query
            (w, w_spread), (qw, qw_spread) = b_windows[t], q_windows[t]
            one = torch.bmm(w.view(n, -1, t * t), q_templates[t].transpose(1, 2)) / w_spread.view(n, -1, 1)
            other = torch.bmm(b_templates[t].view(n, -1, t * t), qw.transpose(1, 2)) / qw_spread[:, None]
            one, other = one.view(n, k, -1).amax(2), other.view(n, k, -1).amax(2)
            best = torch.maximum(best, torch.maximum(one, other))
        best[torch.from_numpy(pick < 0)] = -1.0
        scores[rows] = best
        if report is not None:
            report(min(start + per_batch, q_count), q_count)
    return scores.numpy()


def match(query_images: np.ndarray, base_images: np.ndarray, query_features: np.ndarray,
          base_features: np.ndarray, *, within: bool = False,
          report: Report | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each query image's likeliest duplicate among ``base_images`` and its score: ``(index (Q,) int64, score (Q,)
    float32)``, score >= ``THRESHOLD``: the same photograph; index -1 and score -1 where there is nothing to match
    with. ``within``: the base is the query set itself, and no image matches itself. ``report(done, total)``
    follows the scoring of the candidates."""
    q_count = len(query_images)
    if q_count == 0 or len(base_images) <= int(within):  # nothing to match with
        return np.full(q_count, -1, np.int64), np.full(q_count, -1.0, np.float32)
    index = candidates(query_images, base_images, query_features, base_features, within)
    coarse = pair_scores(query_images, base_images, index, COARSE, report)
    order = np.argsort(-coarse, 1, kind="stable")[:, :FINE_CANDIDATES]
    best = np.take_along_axis(index, order, 1)
    fine = pair_scores(query_images, base_images, best, SIZE)
    top = fine.argmax(1)
    rows = np.arange(q_count)
    return best[rows, top].astype(np.int64), fine[rows, top].astype(np.float32)

