import os
import pickle
import shutil
import urllib.error

import numpy as np
import pytest
import torch
from conftest import make_image_folder

from cifarlab.data import CIFARDataModule
from cifarlab.datasets import stratified_split
from cifarlab.errors import DataError


def _dm(root, **kw):
    kw.setdefault("val_size", 12)
    kw.setdefault("batch_size", 8)
    return CIFARDataModule(root=str(root), **kw)


def test_datamodule_is_empty_until_setup(image_folder):
    dm = _dm(image_folder)
    assert dm.train_set is None and dm.val_set is None and dm.test_set is None and dm.mean is None
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (60, 12, 18)
    assert dm.classes == ["cat", "dog", "frog"] and dm.num_classes == 3


def test_batches_are_uint8_and_labels_int64(image_folder):
    dm = _dm(image_folder)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64


def test_albumentations_backend_batches(image_folder):
    from cifarlab.transforms import AugmentConfig

    dm = _dm(image_folder, augment=AugmentConfig(backend="albumentations"))
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (8,)


def test_validation_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(10), [500] * 9 + [100])
    train, val = stratified_split(labels, 460, seed=1)
    assert len(val) == 460 and len(set(train) & set(val)) == 0 and len(train) + len(val) == len(labels)
    counts = np.bincount(labels[val], minlength=10)
    assert counts.tolist() == [50] * 9 + [10]  # proportional to class sizes
    again, val_again = stratified_split(labels, 460, seed=1)
    assert np.array_equal(val, val_again)
    assert not np.array_equal(val, stratified_split(labels, 460, seed=2)[1])


def test_decode_cache_is_reused_and_rebuilt_when_files_change(image_folder):
    dm = _dm(image_folder)
    dm.prepare_data()
    cache = sorted(p.name for p in dm.cache_dir.glob("train-*.npz"))
    assert len(cache) == 1
    mtime = (dm.cache_dir / cache[0]).stat().st_mtime_ns
    dm.prepare_data()  # unchanged folder: same file, not rewritten
    assert (dm.cache_dir / cache[0]).stat().st_mtime_ns == mtime
    shutil.copy(image_folder / "train/cat/0000.png", image_folder / "train/cat/extra.png")
    dm2 = _dm(image_folder)
    dm2.setup("fit")
    new = sorted(p.name for p in dm2.cache_dir.glob("train-*.npz"))
    assert len(new) == 1 and new != cache  # rebuilt under a new key, stale one removed
    assert len(dm2.train_set) + len(dm2.val_set) == 73


def test_read_only_root_caches_in_home(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if mode == os.W_OK else real_access(p, mode))
    dm = _dm(image_folder)
    assert str(dm.cache_dir).startswith(str(tmp_path / "home"))


# --- errors: one line, naming the problem and what to do
def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _dm(tmp_path / "nope").setup("fit")


def test_folder_without_train_and_test(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match="not a train/test ImageFolder"):
        _dm(tmp_path).setup("fit")


def test_corrupt_image_is_named(image_folder):
    bad = image_folder / "train" / "dog" / "0003.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(DataError, match="0003.png"):
        _dm(image_folder).setup("fit")


def test_truncated_image_is_named(image_folder):
    good = image_folder / "test" / "cat" / "0001.png"
    good.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match=r"test/cat/0001\.png"):
        _dm(image_folder).setup("fit")


def test_classes_differ_between_train_and_test(image_folder):
    shutil.rmtree(image_folder / "test" / "frog")
    (image_folder / "test" / "bird").mkdir()
    with pytest.raises(DataError, match=r"only in train: \['frog'\]; only in test: \['bird'\]"):
        _dm(image_folder).setup("fit")


def test_empty_class_folder(image_folder):
    for split in ("train", "test"):
        (image_folder / split / "zebra").mkdir()
    with pytest.raises(DataError, match="zebra holds no images"):
        _dm(image_folder).setup("fit")


def test_val_size_too_large(tmp_path):
    root = make_image_folder(tmp_path, n_train=2, n_test=1)
    with pytest.raises(DataError, match="val_size"):
        _dm(root, val_size=100).setup("fit")


def test_error_messages_are_one_line(tmp_path):
    with pytest.raises(DataError) as err:
        _dm(tmp_path / "missing").setup("fit")
    assert "\n" not in str(err.value)


# --- torchvision CIFAR-10 source, tested with local fake files (no download here)
def _fake_cifar10(root, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(np.arange(n) % 10)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, f)


def test_cifar10_source_reads_torchvision_files(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    _fake_cifar10(tmp_path)
    # Our fakes have other md5s than the real archive: accept them, keep everything else real.
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    dm = CIFARDataModule(root=str(tmp_path), source="cifar10", val_size=10, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 100 and len(dm.test_set) == 20
    assert dm.classes[0] == "airplane" and dm.num_classes == 10


def test_cifar10_download_failure_is_one_clear_line(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(self):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(CIFAR10, "download", offline)
    dm = CIFARDataModule(root=str(tmp_path / "c10"), source="cifar10")
    with pytest.raises(DataError, match="could not download CIFAR-10.*--data.root"):
        dm.prepare_data()


def test_alternating_flips_mirror_each_image_every_other_epoch(image_folder):
    from types import SimpleNamespace

    from cifarlab.transforms import AugmentConfig

    torch.manual_seed(3)
    dm = _dm(image_folder, augment=AugmentConfig(backend="tensor", pad=0, cutout_size=0, alternate_flips=True))
    dm.trainer = SimpleNamespace(current_epoch=0, world_size=1)
    dm.setup("fit")
    idx = list(range(len(dm.train_set)))
    raw, _ = dm.train_set.batch(idx)
    served = []
    for epoch in range(3):
        dm.trainer.current_epoch = epoch
        assert len(next(iter(dm.train_dataloader()))[0]) == 8  # the loader serves through the same path
        served.append(dm.train_set.__getitems__(idx)[0])
    flipped = (served[0] == raw.flip(3)).flatten(1).all(1)
    assert ((served[0] == raw).flatten(1).all(1) | flipped).all()
    assert 15 <= int(flipped.sum()) <= 45  # a random half in the first epoch
    assert torch.equal(served[1], served[0].flip(3))  # every image the other way round in the next
    assert torch.equal(served[2], served[0])
    # The batch augmentation itself then adds no flips of its own.
    aug = dm.train_transform()
    assert torch.equal(aug(raw), raw.contiguous())


def test_alternating_flips_need_the_tensor_backend(image_folder):
    from cifarlab.errors import ConfigError
    from cifarlab.transforms import AugmentConfig

    with pytest.raises(ConfigError, match="backend tensor"):  # at construction: before a run starts
        _dm(image_folder, augment=AugmentConfig(backend="albumentations", alternate_flips=True))


def test_early_crop_serves_small_crops_in_the_first_epochs_only(image_folder):
    from types import SimpleNamespace

    from cifarlab.transforms import AugmentConfig

    dm = _dm(image_folder, augment=AugmentConfig(backend="tensor", early_crop=20, early_crop_epochs=2))
    dm.trainer = SimpleNamespace(current_epoch=0, world_size=1, training=True)
    dm.setup("fit")
    sizes = []
    for epoch in range(3):
        dm.trainer.current_epoch = epoch
        x, _ = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
        sizes.append(tuple(x.shape[-2:]))
    assert sizes == [(20, 20), (20, 20), (32, 32)]
    dm.trainer.training = False  # validation and test always see whole images
    x, _ = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert tuple(x.shape[-2:]) == (32, 32)


@pytest.mark.parametrize("augment, message", [
    (dict(backend="albumentations", early_crop=24, early_crop_epochs=2), "backend tensor"),
    (dict(backend="tensor", early_crop=8, early_crop_epochs=2), "between 16 and 32 pixels"),
    (dict(backend="tensor", early_crop=40, early_crop_epochs=2), "between 16 and 32 pixels"),
])
def test_bad_early_crop_is_a_config_error(image_folder, augment, message):
    from cifarlab.errors import ConfigError
    from cifarlab.transforms import AugmentConfig

    with pytest.raises(ConfigError, match=message):
        _dm(image_folder, augment=AugmentConfig(**augment))


def test_progress_bars_show_on_a_terminal_only(monkeypatch, capsys):
    import io

    from cifarlab.progress import progress

    assert list(progress(range(5), "work")) == [0, 1, 2, 3, 4]
    assert "work" not in capsys.readouterr().err  # pytest's stderr is not a terminal: no bar in logs
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setattr("sys.stderr", tty)
    assert list(progress(range(3), "decoding x")) == [0, 1, 2]
    assert "decoding x" in tty.getvalue() and "/3 [" in tty.getvalue()  # the bar, with its total
