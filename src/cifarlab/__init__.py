"""cifarlab: train CIFAR-10 classifiers fast with PyTorch Lightning, and look inside them."""

import os

# albumentations checks PyPI for a newer release on import; never call home from a training run.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
