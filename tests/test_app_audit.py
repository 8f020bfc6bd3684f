"""The app's data-audit tabs through gradio_client, as a program would call them: likely label errors,
near-duplicates, the embedding map, and two checkpoints compared."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gradio_client import Client  # noqa: E402
from PIL import Image  # noqa: E402

from cifarlab.app import COMPARE_CHOICES, CifarApp, launch  # noqa: E402

LAYER, METHOD = "layer3 (4x4)", "Grad-CAM"


@pytest.fixture(scope="module")
def served(smoke_run):
    root, run, ckpt = smoke_run
    other = run / "checkpoints" / "last.ckpt"  # another checkpoint of the same classes
    app = CifarApp(ckpt, str(root), compare=other, projection="pca")
    demo = launch(app, "127.0.0.1", None, block=False)
    assert app.wait(timeout=300), app.prep.status()
    client = Client(demo.local_url, verbose=False)
    yield app, client
    demo.close()


def test_label_issues_endpoint_lists_cleanlabs_ranking_with_two_cams(served):
    app, client = served
    issues = app.audit.issues["test"]
    items, summary = client.predict("test", "any", 4, 0.5, LAYER, METHOD, api_name="/label_issues")
    assert f"flags {len(issues.flagged)} of {len(app.test.labels)} test images" in summary
    assert len(items) == min(4, len(issues.flagged))
    for item, i in zip(items, issues.flagged):
        assert item["caption"].startswith(f"test #{i}: given {app.classes[app.test.labels[i]]}")
        assert Image.open(item["image"]).size == (3 * 128 + 2 * 4, 128)  # image | CAM given | CAM suggested
    keep = np.ones(len(app.test.labels), bool)
    keep[issues.flagged] = False
    without = (app.test.preds == app.test.labels)[keep].mean()
    assert f"{without:.2%} without the flagged ones" in summary


def test_train_split_without_an_audit_says_what_to_run(served):
    _, client = served
    with pytest.raises(Exception, match="cifarlab audit"):
        client.predict("train", "any", 4, 0.5, LAYER, METHOD, api_name="/label_issues")


def test_near_duplicates_endpoint_pairs_and_deduplicated_accuracy(served):
    app, client = served
    sim = app.audit.similarity
    threshold = float(np.round(np.sort(sim)[-3], 2)) - 0.01  # at least the 3 most similar test images
    expected = np.flatnonzero(sim >= threshold)
    items, summary = client.predict(threshold, 10, api_name="/near_duplicates")
    assert summary.startswith(f"{len(expected)} of {len(sim)} test images")
    assert len(items) == min(10, len(expected))
    first = expected[np.argmax(sim[expected])]
    assert items[0]["caption"].startswith(f"test #{first} ")
    assert f"train #{app.audit.nearest[first]} " in items[0]["caption"]
    assert Image.open(items[0]["image"]).size == (2 * 128 + 4, 128)
    keep = sim < threshold
    assert f"{(app.test.preds == app.test.labels)[keep].mean():.2%} on the de-duplicated" in summary
    assert "16 training images nearest in the network's features and the 32 nearest by edge" in summary  # the matcher


def test_embedding_near_returns_the_images_closest_to_a_map_point(served):
    app, client = served
    app.embedding_map()
    x0, x1, y0, y1 = app._map_extent["true"]
    target = 5  # click exactly on test image 5's dot
    px = float((app.audit.map2d[target, 0] - x0) / (x1 - x0))
    py = float((y1 - app.audit.map2d[target, 1]) / (y1 - y0))
    items, summary = client.predict(px, py, 3, 0.5, LAYER, METHOD, api_name="/embedding_near")
    assert items[0]["caption"].startswith(f"#{target} true {app.classes[app.test.labels[target]]}")
    assert len(items) == 3 and "The 3 test images nearest" in summary
    with pytest.raises(Exception, match="fractions"):
        client.predict(1.5, 0.5, 3, 0.5, LAYER, METHOD, api_name="/embedding_near")


def test_clicking_the_map_picks_the_dot_under_the_pointer(served):
    import gradio as gr

    from cifarlab.app import MAP_PIXELS

    app, _ = served
    path = app.embedding_map("predicted class")
    assert Image.open(path).size == (MAP_PIXELS, MAP_PIXELS)
    x0, x1, y0, y1 = app._map_extent["pred"]
    pixels = (app.audit.map2d - [x0, y0]) / [x1 - x0, y1 - y0] * MAP_PIXELS  # (N, 2), y from the bottom
    gaps = np.linalg.norm(pixels[:, None] - pixels[None], axis=-1) + np.eye(len(pixels)) * 1e9
    target = int(gaps.min(1).argmax())  # the dot farthest from any other: a click rounded to a pixel still picks it
    px = round((app.audit.map2d[target, 0] - x0) / (x1 - x0) * MAP_PIXELS)
    py = round((y1 - app.audit.map2d[target, 1]) / (y1 - y0) * MAP_PIXELS)
    items, _ = app.map_click(gr.SelectData(None, {"index": [px, py], "value": None}), 1, 0.5, LAYER, METHOD)
    assert items[0][1].startswith(f"#{target} ")


def test_compare_endpoint_and_table_agree_with_each_checkpoints_predictions(served):
    app, client = served
    a, b = app.test, app.other_test
    right_a, right_b = a.preds == a.labels, b.preds == b.labels
    for which, expected in zip(COMPARE_CHOICES, (right_a & ~right_b, right_b & ~right_a)):
        items, summary = client.predict(which, 8, 0.5, LAYER, METHOD, api_name="/compare")
        assert len(items) == min(8, int(expected.sum()))
        assert f"only A is right on {int((right_a & ~right_b).sum())} " in summary
        assert f"only B on {int((right_b & ~right_a).sum())} " in summary
    table = app.compare_table()
    assert table[-1] == ["all", f"{right_a.mean():.2%}", f"{right_b.mean():.2%}",
                         f"{100 * (right_b.mean() - right_a.mean()):+.2f}"]
    assert [row[0] for row in table[:-1]] == app.classes


def test_compare_with_other_classes_is_one_line(smoke_run, tmp_path, capsys):
    from cifarlab.cli import main

    root, _, ckpt = smoke_run
    other = torch.load(ckpt, weights_only=True)
    other["hyper_parameters"]["class_names"] = ["ant", "bee", "wasp"]
    torch.save(other, tmp_path / "other.ckpt")
    with pytest.raises(SystemExit) as exit_:
        main(["app", "--ckpt", str(ckpt), "--data.root", str(root), "--compare", str(tmp_path / "other.ckpt")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ant, bee, wasp" in err[0] and "same classes" in err[0]


def test_report_has_the_audit_and_compare_sections(smoke_run, tmp_path):
    from cifarlab.cli import main

    root, run, ckpt = smoke_run
    main(["report", "--ckpt", str(ckpt), "--data.root", str(root), "--out", str(tmp_path / "r"), "--count", "4",
          "--compare", str(run / "checkpoints" / "last.ckpt"), "--projection", "pca", "--dup_threshold", "0.01"])
    page = (tmp_path / "r" / "index.html").read_text()
    for heading in ("Likely mislabeled test images", "Near-duplicates", "Embedding map", "Compared with"):
        assert heading in page
    for png in ("embedding_map.png", "near_duplicates.png"):
        assert (tmp_path / "r" / png).stat().st_size > 5_000


def test_outliers_endpoint_lists_the_least_typical_images_first(served):
    app, client = served
    order = app.audit.most_unusual("test")
    scores = app.audit.outliers["test"]
    items, summary = client.predict("test", "any", 5, api_name="/outliers")
    assert len(items) == min(5, len(order)) and "least like the training set" in summary
    for item, i in zip(items, order):
        assert item["caption"].startswith(f"test #{i}: labelled {app.classes[app.test.labels[i]]}")
        assert f"outlier score {scores[i]:.3f}" in item["caption"]
    items, _ = client.predict("train", "cat", 3, api_name="/outliers")
    cat = app.classes.index("cat")
    assert all(app.audit.train_labels[int(item["caption"].split("#")[1].split(":")[0])] == cat for item in items)


def test_test_duplicates_endpoint_shows_each_pair_once_most_similar_first(served):
    app, client = served
    pairs, scores = app.audit.test_pairs(0.0)  # loose: most images and their likeliest copy among the others
    assert len(pairs) and (pairs[:, 0] < pairs[:, 1]).all() and len({tuple(p) for p in pairs}) == len(pairs)
    assert (scores[:-1] >= scores[1:]).all()
    items, summary = client.predict(0.0, 4, api_name="/test_duplicates")
    assert summary.startswith(f"{len(pairs)} pairs of test images")
    for item, (i, j), score in zip(items, pairs, scores):
        assert item["caption"].startswith(f"test #{i} ") and f"| test #{j} " in item["caption"]
        assert f"similarity {score:.3f}" in item["caption"]


def test_requests_to_different_tabs_never_run_the_model_at_once(served, monkeypatch):
    """Gradio queues each event listener on its own: without one shared queue, the tabs that fill themselves at page
    load ran CAMs on one network at once and failed ("cannot call bump_version() on undefined tensor")."""
    import threading
    import time

    from cifarlab import views

    app, client = served
    running, most, lock = [0], [0], threading.Lock()
    original = views.predictions_view

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.3)  # long enough for a second request to start if it may
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(views, "predictions_view", counted)
    jobs = [client.submit(api_name=name) for name in ("/mistakes", "/correct", "/mistakes", "/correct")]
    results = [job.result(timeout=120) for job in jobs]
    assert all(isinstance(summary, str) and summary for _, summary in results), results  # none failed
    assert most[0] == 1, f"{most[0]} model requests ran at once"
