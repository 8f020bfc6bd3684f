"""The private names of Lightning, torch and Gradio that cifarlab relies on, with the shape it relies on.

pyproject pins Lightning and Gradio to the minor versions these were checked on. When one of these tests fails after
an upgrade, its message names the upstream issue behind the workaround and the cifarlab file to revisit.
"""

from __future__ import annotations

import csv
import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cifarlab import signals
from cifarlab.loggers import KeepingCSVLogger

SIGNALS = ("src/cifarlab/signals.py", "https://github.com/Lightning-AI/pytorch-lightning/issues/20806")
CSV = ("src/cifarlab/loggers.py", "https://github.com/Lightning-AI/pytorch-lightning/pull/19446")
GRADIO_STUBS = ("src/cifarlab/app.py (_NoStubWriting)", "https://github.com/gradio-app/gradio/issues/7791")


def fence(what: str, where: tuple[str, str]) -> str:
    """The failure message: what changed, in which version, the file to revisit and the link that says why."""
    return (f"{what} changed in lightning {L.__version__} / torch {torch.__version__}: revisit {where[0]} "
            f"(why it uses a private name: {where[1]})")


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_signal_connector_is_the_trainer_attribute_behind_received_sigterm():
    try:
        from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
    except ImportError as err:
        pytest.fail(f"{fence('signal_connector._SignalConnector (import)', SIGNALS)}\n{err}")
    assert _params(_SignalConnector.__init__) == ["self", "trainer"], fence("_SignalConnector(trainer)", SIGNALS)
    assert _params(_SignalConnector.register_signal_handlers) == ["self"], \
        fence("_SignalConnector.register_signal_handlers()", SIGNALS)
    assert callable(getattr(_SignalConnector, "teardown", None)), fence("_SignalConnector.teardown()", SIGNALS)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    connector = getattr(trainer, "_signal_connector", None)
    assert isinstance(connector, _SignalConnector), fence("Trainer._signal_connector", SIGNALS)
    assert connector.trainer is trainer and connector.received_sigterm is False, \
        fence("_SignalConnector.trainer / .received_sigterm", SIGNALS)
    connector.received_sigterm = True  # what StopOnSignal sets on every rank at the same batch
    assert trainer.received_sigterm is True, fence("Trainer.received_sigterm (no longer reads the connector)", SIGNALS)


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SignalAt(L.Callback):
    """Records which handlers the loop runs under, then calls the installed SIGTERM handler before batch ``at``
    (calling it, not sending the signal: if the handler were not installed, a real SIGTERM would end pytest)."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, {}

    def on_train_start(self, trainer, pl_module) -> None:
        connector = trainer._signal_connector
        self.seen = {"connector": type(connector), "SIGTERM": signal.getsignal(signal.SIGTERM),
                     "SIGINT": signal.getsignal(signal.SIGINT), "ours": connector._on_stop_signal}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.at:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)


def test_trainer_runs_under_our_connector_and_stops_at_the_batch_it_flags(monkeypatch):
    monkeypatch.setattr(signals, "_received", [])  # the CLI's record of signals, global to the process
    before = signal.getsignal(signal.SIGTERM)
    data = TensorDataset(torch.randn(16, 2), torch.randint(0, 2, (16,)))
    probe = _SignalAt(at=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[signals.StopOnSignal(), probe])
    with pytest.raises(SIGTERMException):
        trainer.fit(_Tiny(), DataLoader(data, batch_size=2))
    # StopOnSignal swaps the connector in `setup`: Lightning must register its handlers after that hook.
    assert probe.seen["connector"] is signals._FlagOnlySignals, fence("when Trainer builds or registers the connector",
                                                                      SIGNALS)
    assert probe.seen["SIGTERM"] == probe.seen["ours"] and probe.seen["SIGINT"] == probe.seen["ours"], \
        fence("_SignalConnector.register_signal_handlers (ours are not the handlers installed)", SIGNALS)
    # Setting received_sigterm in on_train_batch_end makes the loop raise at the end of that same batch.
    assert trainer.global_step == 2, fence("where the training loop reads received_sigterm", SIGNALS)
    assert signal.getsignal(signal.SIGTERM) == before, fence("_SignalConnector.teardown (handlers not restored)",
                                                             SIGNALS)
    assert signals.received_signal() == signal.SIGTERM


def test_csv_writer_still_deletes_metrics_through_the_check_we_override(tmp_path):
    assert _params(ExperimentWriter._check_log_dir_exists) == ["self"], \
        fence("ExperimentWriter._check_log_dir_exists()", CSV)
    (tmp_path / "metrics.csv").write_text("a,step\n1.0,0\n")
    with pytest.warns(UserWarning, match="exists and is not empty"):
        ExperimentWriter(str(tmp_path))
    # Upstream kept the file: KeepingCSVLogger may no longer be needed.
    assert not (tmp_path / "metrics.csv").exists(), fence("ExperimentWriter (metrics.csv no longer deleted)", CSV)


def test_keeping_csv_logger_appends_through_csvloggers_experiment_slot(tmp_path):
    assert vars(CSVLogger(tmp_path)).get("_experiment", "missing") is None, fence("CSVLogger._experiment", CSV)
    run = tmp_path / "exp" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("a,step\n1.0,0\n")
    (run / "hparams.yaml").write_text("{}\n")  # a resumed run's folder is not empty
    logger = KeepingCSVLogger(tmp_path, name="exp", version=0)
    logger.log_metrics({"a": 2.0}, step=1)
    logger.finalize("success")  # Lightning saves only when _experiment is set
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["a", "step"], ["1.0", "0"], ["2.0", "1"]], fence("CSVLogger.experiment / save / finalize", CSV)


def test_exact_split_sampler_splits_evaluation_sets_exactly():
    """The public replacement of Lightning's private UnrepeatedDistributedSampler: no image twice, none left out."""
    from cifarlab.data import ExactSplitSampler

    data = list(range(10))
    splits = [list(ExactSplitSampler(data, num_replicas=3, rank=r)) for r in range(3)]
    assert splits == [data[r::3] for r in range(3)]
    assert [len(ExactSplitSampler(data, num_replicas=3, rank=r)) for r in range(3)] == [4, 3, 3]
    assert isinstance(ExactSplitSampler(data, 3, 0), DistributedSampler)


def test_the_app_imports_gradio_without_its_stub_writer():
    """Gradio's component classes call ``component_meta.create_or_modify_pyi`` as they are defined; the app loads that
    module with a no-op in its place (a second off each start), and the page still builds."""
    code = ("import inspect, cifarlab.app, gradio, gradio.component_meta as m\n"
            "print(gradio.__version__)\n"
            "print(m.create_or_modify_pyi.__module__)\n"
            "call = 'create_or_modify_pyi(component_class, name, events)'\n"
            "print(call in inspect.getsource(m.ComponentMeta.__new__))\n"
            "import ast; tree = ast.parse(inspect.getsource(m))\n"
            "stub_writer = [f for f in tree.body if getattr(f, 'name', '') == 'create_or_modify_pyi']\n"
            "print([[a.arg for a in f.args.args] for f in stub_writer])\n"
            "import gradio as gr\n"
            "with gr.Blocks() as page:\n"
            "    gr.Image(); gr.Gallery()\n"
            "print(type(page).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    version, module, called, params, page = out.stdout.split("\n")[:5]
    where = f"gradio {version}: revisit {GRADIO_STUBS[0]} (why it replaces a private function: {GRADIO_STUBS[1]})"
    assert called == "True", f"ComponentMeta.__new__ no longer calls create_or_modify_pyi(...) in {where}"
    assert module == "cifarlab.app", f"component_meta.create_or_modify_pyi was not replaced in {where}"
    assert params == "[['component_class', 'class_name', 'events']]", \
        f"create_or_modify_pyi's arguments changed in {where}"
    assert page == "Blocks"


def test_launcher_observer_ends_with_one_line_when_a_launched_rank_dies():
    # A dead child rank and a live one: the patched observer stops the live one and exits 1 with the one line.
    code = (
        "import subprocess, sys\n"
        "from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver\n"
        "from cifarlab.signals import exit_when_a_launched_rank_dies\n"
        "exit_when_a_launched_rank_dies()\n"
        "dead = subprocess.Popen([sys.executable, '-c', 'raise SystemExit(3)']); dead.wait()\n"
        "live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(live.pid, flush=True)\n"
        "_ChildProcessObserver(main_pid=0, child_processes=[dead, live])._run()\n"
        "print('not reached')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    where = ("src/cifarlab/signals.py (exit_when_a_launched_rank_dies)", "lightning's _ChildProcessObserver")
    assert run.returncode == 1, fence(f"_ChildProcessObserver._terminate_all ({run.stderr[-300:]})", where)
    assert "not reached" not in run.stdout
    assert run.stderr.strip().splitlines()[-1] == (
        "cifarlab: error: another process of this 3-process run died or stopped answering (rank 1 exited with 3); "
        "checkpoints already saved are intact: resume with the same command and --ckpt_path last")
    status = f"/proc/{int(run.stdout.split()[0])}/status"
    for _ in range(50):  # the live rank is stopped, as Lightning stops it: gone, or a zombie nobody reaped yet
        if not os.path.exists(status) or "State:\tZ" in Path(status).read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the live rank was left running")
