"""ONNX export: onnxruntime gives the same probabilities as PyTorch on real test images, for any batch size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cifarlab.checkpoint import load_classifier
from cifarlab.cli import main
from cifarlab.export import export_onnx
from cifarlab.module import ImageClassifier

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_command_matches_pytorch_on_test_images(smoke_run, tmp_path, capsys):
    root, _, ckpt = smoke_run
    out = tmp_path / "model.onnx"
    main(["export", "--ckpt", str(ckpt), "--format", "onnx", "--out", str(out)])
    assert "input 'images' (N, 3, 32, 32) uint8" in capsys.readouterr().out
    model = load_classifier(ckpt)
    from cifarlab.inference import eval_data

    dm = eval_data(model, str(root))
    x, _ = dm.test_set.batch(range(len(dm.test_set)))  # (18, 3, 32, 32) uint8, as the model was tested
    with torch.no_grad():
        expected = model(x).float().softmax(1).numpy()
    session = _session(out)
    for batch in (x[:1], x[:5], x):  # the batch dimension is dynamic
        got = session.run(["probs"], {"images": batch.numpy()})[0]
        np.testing.assert_allclose(got, expected[: len(batch)], atol=1e-4, rtol=0)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["class_names"]) == model.class_names
    assert "uint8" in meta["preprocessing"]
    np.testing.assert_allclose(json.loads(meta["mean"]), model.normalize.mean.numpy(), atol=1e-6)


@pytest.mark.parametrize("tta, selective", [(False, False), (True, False), (True, True)])
def test_export_of_the_fast_network_with_and_without_tta(tmp_path, tta, selective):
    torch.manual_seed(0)
    model = ImageClassifier(arch="airbench", class_names=["a", "b", "c", "d"], tta={"level": 2}).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong eval-mode export would show
        for bn in model.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    if selective:  # half the images confident enough to skip the views: the graph must pick per image
        with torch.no_grad():
            conf = model(x).softmax(1).amax(1)
        model.hparams.tta = {"level": 2, "confident_at": conf.median().item()}
    path = export_onnx(model, tmp_path / "fast.onnx", tta=tta)
    with torch.no_grad():
        expected = (model.tta_logits(x) if tta else model(x)).float().softmax(1).numpy()
    got = _session(path).run(["probs"], {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert got.shape == (6, 4) and np.allclose(got.sum(1), 1, atol=1e-5)


def test_export_of_an_unsafe_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--ckpt", str(bad), "--format", "onnx"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable PyTorch checkpoint" in err[0]
    assert not list(tmp_path.glob("*.onnx"))
