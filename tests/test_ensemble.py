"""The label ranking from several checkpoints: ``--ckpt A B C`` averages their test probabilities."""

import numpy as np
import pytest
import torch

from cifarlab.audit import DataAudit, label_issues, load_ensemble
from cifarlab.checkpoint import load_classifier
from cifarlab.commands.parsing import split_checkpoints
from cifarlab.datasets import DataSource
from cifarlab.inference import predict_test_set


def test_ckpt_with_several_paths_becomes_the_first_and_an_ensemble():
    assert split_checkpoints(["--ckpt", "a.ckpt", "b.ckpt", "c.ckpt", "--port", "1"]) == \
        ["--ckpt", "a.ckpt", "--ensemble", '["b.ckpt", "c.ckpt"]', "--port", "1"]
    assert split_checkpoints(["--data.root", "d", "--ckpt", "a.ckpt"]) == ["--data.root", "d", "--ckpt", "a.ckpt"]
    assert split_checkpoints(["--ckpt=a.ckpt", "--count", "3"]) == ["--ckpt=a.ckpt", "--count", "3"]


def test_the_test_ranking_uses_the_mean_of_the_ensembles_probabilities(smoke_run):
    root, run, ckpt = smoke_run
    other = run / "checkpoints" / "last.ckpt"
    model, data = load_classifier(ckpt), DataSource(str(root))
    test = predict_test_set(model, ckpt, data)
    members = load_ensemble([other], list(model.class_names), ckpt)
    audit = DataAudit(model, ckpt, test, data, "pca", ensemble=members)
    audit.find_label_issues()
    mean = (test.probs + predict_test_set(members[0][1], other, data).probs) / 2
    assert np.allclose(audit.test_probs, mean, atol=1e-6)
    assert np.array_equal(audit.issues["test"].flagged, label_issues(test.labels, mean).flagged)
    assert "mean test probabilities of 2 checkpoints" in audit.test_source
    alone = DataAudit(model, ckpt, test, data, "pca")
    alone.find_label_issues()
    assert np.array_equal(alone.test_probs, test.probs) and "this checkpoint's" in alone.test_source


def test_report_with_an_ensemble_says_which_probabilities_rank_the_labels(smoke_run, tmp_path):
    from cifarlab.cli import main

    root, run, ckpt = smoke_run
    main(["report", "--ckpt", str(ckpt), str(run / "checkpoints" / "last.ckpt"), "--data.root", str(root),
          "--out", str(tmp_path / "r"), "--count", "4", "--projection", "pca"])
    page = (tmp_path / "r" / "index.html").read_text()
    assert "Ranked from the mean test probabilities of 2 checkpoints" in page


def test_an_ensemble_member_with_other_classes_is_one_line(smoke_run, tmp_path, capsys):
    from cifarlab.cli import main

    root, _, ckpt = smoke_run
    other = torch.load(ckpt, weights_only=True)
    other["hyper_parameters"]["class_names"] = ["ant", "bee", "wasp"]
    torch.save(other, tmp_path / "other.ckpt")
    with pytest.raises(SystemExit) as exit_:
        main(["app", "--ckpt", str(ckpt), str(tmp_path / "other.ckpt"), "--data.root", str(root)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ant, bee, wasp" in err[0] and "ensemble" in err[0]
