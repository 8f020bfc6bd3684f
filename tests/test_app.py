"""The app, launched in-process on 127.0.0.1 and called through gradio_client, as a program would."""

import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from PIL import Image  # noqa: E402

from cifarlab.app import ANY, CifarApp, launch  # noqa: E402


@pytest.fixture(scope="module")
def served(smoke_run):
    root, _, ckpt = smoke_run
    app = CifarApp(ckpt, str(root))
    demo = launch(app, "127.0.0.1", None, block=False)
    assert app.wait(timeout=300), app.prep.status()
    client = Client(demo.local_url, verbose=False)
    yield app, demo, client
    demo.close()


def test_the_page_answers_before_the_data_is_ready_and_the_tabs_fill_themselves(smoke_run):
    """Classify works while the test set is still being prepared; the data endpoints say what they wait for, and
    the page's poll turns each tab's ready flag on when its data is there."""
    import threading

    root, _, ckpt = smoke_run
    app = CifarApp(ckpt, str(root), projection="pca")
    hold = threading.Event()
    predict = app.prep.steps["test"].run
    app.prep.steps["test"].run = lambda report: (hold.wait(60), predict(report))
    demo = launch(app, "127.0.0.1", None, block=False)
    try:
        client = Client(demo.local_url, verbose=False)
        label, *_ = client.predict(handle_file(str(root / "test" / "cat" / "0000.png")), 2, 0.5, "layer3 (4x4)",
                                   "Grad-CAM", api_name="/classify")
        assert len(label["confidences"]) == 2
        status = client.predict(api_name="/status")
        assert status["test"]["state"] == "running" and status["map"]["state"] == "waiting"
        with pytest.raises(Exception, match="Preparing: the test-set predictions"):
            client.predict("any", "any", 3, 0.5, "layer3 (4x4)", "Grad-CAM", api_name="/mistakes")
        texts_and_flags = app.poll()
        tabs = len(texts_and_flags) // 2  # (texts, flags, timer) over examples, mistakes, correct, ... tabs
        flags = texts_and_flags[tabs:2 * tabs]
        assert flags[0] and not any(flags[1:])  # the examples need only the test set, loaded by now
        assert "the test-set predictions" in texts_and_flags[1]  # the Mistakes tab says what it waits for
        hold.set()
        while not app.prep.finished():  # requests while the background work runs must not disturb it
            client.predict(handle_file(str(root / "test" / "dog" / "0001.png")), 1, 0.5, "layer3 (4x4)",
                           "Grad-CAM", api_name="/classify")
        assert app.wait(timeout=300), app.prep.status()
        assert len(app.audit.test_features) == len(app.test.labels)
        assert len(app.audit.similarity) == len(app.test.labels)
        texts_and_flags = app.poll()
        assert all(texts_and_flags[tabs:2 * tabs]) and not any(texts_and_flags[:tabs])
        items, summary = client.predict("any", "any", 3, 0.5, "layer3 (4x4)", "Grad-CAM", api_name="/mistakes")
        assert "test images" in summary
    finally:
        hold.set()
        demo.close()


def test_a_page_without_data_still_classifies_and_says_why_the_tabs_stay_empty(smoke_run, tmp_path):
    root, _, ckpt = smoke_run
    app = CifarApp(ckpt)  # no --data.root, and the data the checkpoint was trained on has gone
    app.model.datamodule_hparams = {**app.model.datamodule_hparams, "root": str(tmp_path / "gone")}
    app.start()
    assert not app.wait(timeout=120)
    assert "Not available" in app.prep.waiting_for("test") and "--data.root" in app.prep.waiting_for("data")
    label, *_ = app.classify_image(str(root / "test" / "cat" / "0000.png"), 2)
    assert len(label) == 2


def test_served_on_loopback_only(served):
    _, demo, _ = served
    assert demo.local_url.startswith("http://127.0.0.1:")
    assert demo.share_url is None


@pytest.mark.parametrize("k", [1, 3])
def test_classify_returns_the_sorted_top_k_and_three_images(served, smoke_run, k):
    app, _, client = served
    root, _, _ = smoke_run
    image = root / "test" / "frog" / "0001.png"
    label, seen, heat, over, faith = client.predict(handle_file(str(image)), k, 0.5, "layer2 (8x8)", "Grad-CAM++",
                                                    api_name="/classify")
    confidences = label["confidences"]
    assert len(confidences) == k
    probs = [c["confidence"] for c in confidences]
    assert probs == sorted(probs, reverse=True)
    # The same answer as the model on the same file, outside the app.
    from cifarlab.inference import classify, decode_upload, model_input

    expected = classify(app.model, model_input(decode_upload(image)))[0]
    assert label["label"] == app.classes[int(expected.argmax())]
    for path in (seen, heat, over):
        assert Image.open(path).size == (224, 224)
    assert "Faithfulness" in faith


def test_large_photo_is_resized(served, tmp_path):
    _, _, client = served
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (4032, 3024), (90, 120, 200)).save(photo, quality=80)
    label, seen, *_ = client.predict(handle_file(str(photo)), 3, 0.5, "layer3 (4x4)", "Grad-CAM",
                                     api_name="/classify")
    assert len(label["confidences"]) == 3


@pytest.mark.parametrize("name, content, message", [
    ("empty.png", b"", "empty"),
    ("notes.png", b"just some text, not pixels", "not an image"),
])
def test_bad_uploads_get_a_message_and_the_server_keeps_serving(served, smoke_run, tmp_path, name, content, message):
    _, _, client = served
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(Exception) as err:
        client.predict(handle_file(str(bad)), 3, 0.5, "layer3 (4x4)", "Grad-CAM", api_name="/classify")
    assert message in str(err.value)
    root, _, _ = smoke_run
    label, *_ = client.predict(handle_file(str(root / "test" / "cat" / "0000.png")), 2, 0.5, "layer3 (4x4)",
                               "Grad-CAM", api_name="/classify")
    assert len(label["confidences"]) == 2


def test_mistakes_and_correct_galleries(served):
    app, _, client = served
    for kind in ("mistakes", "correct"):
        items, summary = client.predict("any", "any", 5, 0.5, "layer3 (4x4)", "Grad-CAM", api_name=f"/{kind}")
        idx = app.select(kind)
        assert len(items) == min(5, len(idx))
        assert f"{len(idx)} {kind}" in summary
        for item in items:
            assert ("true " in item["caption"]) and ("pred " in item["caption"])


def test_mistakes_are_sorted_most_confident_first_and_filtered(served):
    app, _, _ = served
    t = app.test
    idx = app.select("mistakes")
    assert (t.preds[idx] != t.labels[idx]).all()
    assert (t.confidence[idx][:-1] >= t.confidence[idx][1:]).all()
    cat = app.select("correct", true_cls="cat")
    assert (t.labels[cat] == app.classes.index("cat")).all()


def test_clicking_a_confusion_cell_shows_those_images(served):
    import gradio as gr

    app, _, _ = served
    image, per_class, matrix = app.confusion_outputs()
    assert Image.open(image).size[0] > 200
    assert [row[0] for row in matrix] == app.classes
    cat, dog = app.classes.index("cat"), app.classes.index("dog")
    evt = gr.SelectData(None, {"index": [cat, cat + 1], "value": matrix[cat][cat + 1]})  # the (cat, cat) cell
    items, summary = app.cell_mistakes(evt, 4, 0.5, "layer3 (4x4)", "Grad-CAM")
    assert f"{matrix[cat][cat + 1]} correct" in summary
    assert all("true cat | pred cat" in caption for _, caption in items)
    evt = gr.SelectData(None, {"index": [cat, dog + 1], "value": matrix[cat][dog + 1]})  # true cat, predicted dog
    items, summary = app.cell_mistakes(evt, 4, 0.5, "layer3 (4x4)", "Grad-CAM")
    assert f"{matrix[cat][dog + 1]} mistakes" in summary


def test_app_with_a_missing_checkpoint_is_one_line(capsys):
    from cifarlab.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["app", "--ckpt", "/nonexistent/model.ckpt"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]


def test_concurrent_requests_are_all_answered_correctly_without_leaking(served, smoke_run):
    """A smaller version of benchmarks/app_load.py (50 requests, server RSS): every request in flight at once."""
    import gc
    import sys
    import tracemalloc

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from app_load import fire, pick_images

    app, _, client = served
    root, _, _ = smoke_run
    images = pick_images(root, 12)
    assert len({p.parent.name for p in images}) == 3  # every class is asked for
    layer = next(iter(app.layers))  # the default
    waves = [fire(client, app.model, images, layer, "Grad-CAM")]  # warm-up: caches, lazy imports
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    waves += [fire(client, app.model, images, layer, "Grad-CAM") for _ in range(2)]
    gc.collect()
    grown = sum(d.size_diff for d in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    for wave in waves:
        assert wave["errors"] == [] and wave["answered"] == 12 and wave["wrong"] == 0
    # Python objects still alive after 24 more requests (uploads, CAMs, panels, hooks, figures would each be
    # 10-150 KB per request); Gradio keeps a small record per event.
    assert grown < 24 * 16 * 1024, f"{grown / 1024:.0f} KB kept after 24 requests"


def test_the_same_image_sent_many_times_at_once_is_always_delivered_whole(served, smoke_run):
    """Identical requests make identical output images: none may be rewritten while another client downloads it."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from app_load import fire

    app, _, client = served
    root, _, _ = smoke_run
    image = root / "test" / "dog" / "0002.png"
    layer = next(iter(app.layers))
    for _ in range(3):
        wave = fire(client, app.model, [image] * 12, layer, "Grad-CAM")
        assert wave["errors"] == [] and wave["answered"] == 12 and wave["wrong"] == 0
    # Many people on one gallery: the same thumbnails, every one delivered to every client.
    from concurrent.futures import ThreadPoolExecutor

    def gallery():
        items, _ = client.submit(ANY, ANY, 6, 0.5, layer, "Grad-CAM", api_name="/correct").result(timeout=600)
        return [Image.open(item["image"]).size for item in items]

    with ThreadPoolExecutor(8) as pool:
        sizes = [f.result() for f in [pool.submit(gallery) for _ in range(8)]]
    assert sizes == [[(128, 128)] * 6] * 8


def test_output_files_are_pruned_as_they_age(served, smoke_run):
    """A long-running app keeps its temp files bounded: Gradio's pruning removes old panels, not ones in use again."""
    import time

    from gradio.route_utils import delete_files_created_by_app

    from cifarlab.app import GRADIO_CACHE_AGE

    app, demo, client = served
    root, _, _ = smoke_run
    assert demo.delete_cache == (GRADIO_CACHE_AGE, GRADIO_CACHE_AGE)

    def classify(image):
        """The panels' files on the server (the client gets copies) after a request for ``image``."""
        client.predict(handle_file(str(image)), 3, 0.5, "layer3 (4x4)", "Grad-CAM", api_name="/classify")
        return {Path(p) for p in app.classify_image(str(image), 3, 0.5, "layer3 (4x4)", "Grad-CAM")[1:4]}

    reused = classify(root / "test" / "cat" / "0003.png")
    old = classify(root / "test" / "frog" / "0004.png")
    assert reused and old and not reused & old
    time.sleep(1.5)
    classify(root / "test" / "cat" / "0003.png")  # the same panels again: young again
    delete_files_created_by_app(demo, age=1)  # what delete_cache runs every GRADIO_CACHE_AGE seconds
    assert all(p.exists() for p in reused) and not any(p.exists() for p in old)
