"""``cifarlab report``: a self-contained HTML report folder for a checkpoint (curves, confusion matrix, mistakes with
CAMs, likely label errors, near-duplicates, the embedding map, a second run compared)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from jsonargparse.typing import PositiveInt

from cifarlab.audit import DUPLICATE_SIMILARITY
from cifarlab.commands.parsing import CHECKPOINT_DATA, EvalData, command_parser, parse
from cifarlab.errors import CifarlabError, needs_extra


def report(ckpt: str, data: EvalData = CHECKPOINT_DATA, out: str | None = None, count: PositiveInt = 32,
           compare: str | None = None, dup_threshold: float = DUPLICATE_SIMILARITY,
           projection: Literal["tsne", "pca"] = "tsne", ensemble: list[str] | None = None) -> Path:
    """Write an HTML report (curves, confusion matrix, mistakes + CAMs, likely label errors, near-duplicates,
    embedding map, a second run compared); prints each section as it goes.

    Args:
        ckpt: A checkpoint written by `cifarlab fit` (`--ckpt A B C`: A, with B and C as the ensemble).
        data: The test images the report is about.
        out: Output folder (default: <run dir>/report).
        count: Images shown per section.
        compare: A second checkpoint (same classes) to compare with.
        dup_threshold: Similarity in (0, 1] from which a test image counts as a near-duplicate of a training image.
        projection: How the embedding map is drawn (t-SNE: clearer clusters; PCA: faster).
        ensemble: More checkpoints of the same classes: the likely label errors are ranked from the mean of all
            their test probabilities (more reliable than one run's); every other section is about the first.
    """
    if not 0 < dup_threshold <= 1:
        raise CifarlabError(f"--dup_threshold {dup_threshold}: give a similarity in (0, 1]")
    with needs_extra("app"):
        import cleanlab  # noqa: F401  (an optional extra: the data audit's label issues, checked before any work)

        from cifarlab.report import run_report  # draws CAMs with grad-cam, an optional extra

    return run_report(ckpt, data.root, data.source, out, count, compare, dup_threshold, projection,
                      ensemble=ensemble or [])


def main(argv: list[str]) -> None:
    report(**parse(command_parser(report, "cifarlab report"), argv))
