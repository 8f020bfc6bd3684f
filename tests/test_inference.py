"""Checkpoint loading without unpickling code, and decoding whatever a user uploads."""

import io
import json

import numpy as np
import pytest
import torch
from conftest import NARROW, make_image_folder
from PIL import Image

from cifarlab.checkpoint import load_classifier
from cifarlab.cli import main
from cifarlab.errors import CifarlabError
from cifarlab.inference import ImageError, decode_upload, model_input, predict_test_set


def _png(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# --- checkpoints
def test_checkpoint_rebuilds_model_with_class_names(smoke_run):
    _, _, ckpt = smoke_run
    model = load_classifier(ckpt)
    assert model.class_names == ["cat", "dog", "frog"] and not model.training
    assert model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 3)


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_payload_is_refused_and_never_runs(smoke_run, tmp_path, monkeypatch):
    _, _, ckpt = smoke_run
    monkeypatch.chdir(tmp_path)
    data = torch.load(ckpt, weights_only=True)
    data["evil"] = _Payload()
    bad = tmp_path / "evil.ckpt"
    torch.save(data, bad)
    with pytest.raises(CifarlabError, match="refusing to load"):
        load_classifier(bad)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable"),
    (b"hello, not a checkpoint", "not a readable"),
])
def test_not_a_checkpoint(tmp_path, content, message):
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    with pytest.raises(CifarlabError, match=message):
        load_classifier(path)


def test_checkpoint_of_another_network_is_one_line(smoke_run, tmp_path):
    _, _, ckpt = smoke_run
    data = torch.load(ckpt, weights_only=True)
    data["state_dict"] = {k: v for k, v in data["state_dict"].items() if "layer3" not in k}
    path = tmp_path / "partial.ckpt"
    torch.save(data, path)
    with pytest.raises(CifarlabError, match="do not fit") as err:
        load_classifier(path)
    assert "\n" not in str(err.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CifarlabError, match="not found"):
        load_classifier(tmp_path / "nope.ckpt")


# --- images
@pytest.mark.parametrize("make", [
    lambda: Image.new("RGB", (40, 30), (200, 10, 10)),
    lambda: Image.new("L", (32, 32), 128),
    lambda: Image.new("RGBA", (32, 32), (0, 0, 255, 128)),
    lambda: Image.new("P", (32, 32), 3),
    lambda: Image.new("CMYK", (33, 31), (0, 255, 255, 0)),
    lambda: Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)),
    lambda: Image.new("1", (16, 16), 1),
    lambda: Image.new("RGB", (1, 1), (1, 2, 3)),
])
@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_odd_modes_decode_to_rgb(make, fmt):
    img = make()
    if fmt == "PNG" and img.mode == "CMYK":
        fmt = "JPEG"
    out = decode_upload(_png(img, fmt))
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert model_input(out).shape == (1, 3, 32, 32)


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert (decode_upload(_png(img)) == 255).all()


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[274] = 6  # rotate 90 degrees
    out = decode_upload(_png(img, "JPEG", exif=exif.tobytes()))
    assert out.shape[:2] == (40, 20)


def test_animation_takes_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_upload(buf.getvalue())
    assert out[0, 0, 0] > 200 and out[0, 0, 1] < 50


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"%PDF-1.4 not an image", "not an image"),
])
def test_bad_uploads(data, message):
    with pytest.raises(ImageError, match=message):
        decode_upload(data)


def test_truncated_image():
    data = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageError, match="damaged or truncated"):
        decode_upload(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding():
    # A 20000x20000 PNG of one colour compresses to a few hundred KB but would decode to 1.2 GB.
    bomb = _png(Image.new("L", (20000, 20000), 0), "PNG", optimize=True)
    assert len(bomb) < 2_000_000
    with pytest.raises(ImageError, match="above the 40 M limit"):
        decode_upload(bomb)


# --- predict / report / cached predictions
def test_predict_prints_json_lines(smoke_run, tmp_path, capsys):
    root, _, ckpt = smoke_run
    good = root / "test" / "dog" / "0000.png"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(good), str(bad), "--ckpt", str(ckpt), "--top_k", "2"])
    assert exit_.value.code == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines[0]["top_k"]) == 2 and lines[0]["top_k"][0]["prob"] >= lines[0]["top_k"][1]["prob"]
    assert "error" in lines[1]


def test_test_predictions_reuse_the_runs_file(smoke_run):
    root, run, ckpt = smoke_run
    model = load_classifier(ckpt)
    from cifarlab.inference import eval_data

    dm = eval_data(model)  # the training root, taken from the checkpoint
    preds = predict_test_set(model, ckpt, dm)
    saved = np.load(run / "test_predictions.npz")
    np.testing.assert_allclose(preds.probs, saved["probs"].astype(np.float32))
    acc = json.loads((run / "test_metrics.json").read_text())["test_acc"]
    assert (preds.preds == preds.labels).mean() == pytest.approx(acc)


def test_report_writes_html_and_pngs(smoke_run, tmp_path):
    root, _, ckpt = smoke_run
    main(["report", "--ckpt", str(ckpt), "--data.root", str(root), "--out", str(tmp_path / "rep")])
    html = (tmp_path / "rep" / "index.html").read_text()
    for png in ("confusion_matrix.png", "curves.png"):
        assert (tmp_path / "rep" / png).exists() and png in html


def test_predict_takes_folders_and_globs_in_batches_with_the_recipes_tta(tmp_path, capsys):
    """predict, the app and the report answer with the recipe's TTA: the probabilities fit's test saved."""
    from cifarlab.data import CIFARDataModule
    from cifarlab.inference import classify

    root = make_image_folder(tmp_path / "data", n_train=16, n_test=4)
    main(["fit", "--config", "fast", "--data.root", str(root), "--run.dir", str(tmp_path / "runs"), *NARROW,
          "--trainer.max_epochs", "1", "--trainer.precision", "32-true", "--data.batch_size", "16",
          "--data.eval_batch_size", "5", "--trainer.enable_progress_bar", "false"])
    run = tmp_path / "runs" / "fast" / "version_0"
    ckpt = next((run / "checkpoints").glob("epoch*.ckpt"))
    model = load_classifier(ckpt)
    assert model.tta.level == 2
    dm = CIFARDataModule(root=str(root), val_size=0)
    dm.setup("test")
    x, _ = dm.test_set.batch(range(len(dm.test_set)))
    saved = np.load(run / "test_predictions.npz")["probs"].astype(np.float32)  # stored as float16
    np.testing.assert_allclose(classify(model, x).numpy(), saved, atol=5e-4)  # the same answer as fit's test
    with torch.no_grad():
        plain = model(x).softmax(1).numpy()
    assert np.abs(plain - saved).max() > 2e-3  # ... which is not the plain forward's

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(root / "test" / "cat"), str(root / "test" / "dog" / "*.png"), str(root / "nothing*"),
              "--ckpt", str(ckpt), "--top_k", "2", "--batch_size", "3", "--device", "cpu"])
    assert exit_.value.code == 1  # the glob that matched nothing
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"image": str(root / "nothing*"), "error": "no such file, or no image in that folder or glob"}
    assert [line["image"] for line in lines[1:]] == sorted(str(p) for p in (root / "test" / "cat").iterdir()) + \
        sorted(str(p) for p in (root / "test" / "dog").glob("*.png"))
    for line in lines[1:]:
        expected = classify(model, model_input(decode_upload(line["image"])))[0]  # one image alone
        assert [t["class"] for t in line["top_k"]] == [model.class_names[i] for i in expected.topk(2).indices]
        assert [t["prob"] for t in line["top_k"]] == pytest.approx(expected.topk(2).values.tolist(), abs=1e-4)


def test_predict_with_an_unknown_device_is_one_line(smoke_run, capsys):
    root, _, ckpt = smoke_run
    with pytest.raises(SystemExit) as exit_:
        main(["predict", str(root / "test"), "--ckpt", str(ckpt), "--device", "tpu7"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cifarlab: error: --device tpu7:")
