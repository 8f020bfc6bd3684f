"""``cifarlab stats``: the training split's mean/std (computed once, cached beside the data) and a preview of the
recipe's augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from jsonargparse.typing import PositiveInt

from cifarlab.commands.recipe import RecipeCLI
from cifarlab.plots import save_image_grid


def stats(cli: RecipeCLI, out: str | None = None, num_images: PositiveInt = 32) -> None:
    """Print the mean/std of the recipe's training split and write a grid of augmented training images.

    Args:
        out: Where to write augmentations.png (default <run.dir>/stats).
        num_images: Images in the preview grid.
    """
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("fit")
    print(f"training images: {len(dm.train_set) + len(dm.val_set or [])} ({len(dm.classes)} classes) in {dm.data_root}")
    print(f"mean: {np.array2string(np.array(dm.mean), precision=4)}")
    print(f"std:  {np.array2string(np.array(dm.std), precision=4)}")
    print(f"cached in {dm.cache_dir}")
    folder = Path(out or Path(cli.config["run"]["dir"]) / "stats")
    folder.mkdir(parents=True, exist_ok=True)
    n = min(num_images, len(dm.train_set))
    x, y = dm.train_set.batch(range(n))  # raw uint8, augmented below by the recipe's back end
    aug = dm.train_transform()(x)
    save_image_grid(aug.numpy(), [dm.classes[i] for i in y.tolist()], folder / "augmentations.png",
                    title=f"training augmentation ({dm.augment.backend})")
    print(f"augmentation preview: {folder / 'augmentations.png'}")


def main(argv: list[str]) -> None:
    RecipeCLI(stats, argv).run_command()
