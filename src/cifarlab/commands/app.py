"""``cifarlab app``: the Gradio page for a checkpoint (predictions, Grad-CAM, the data audit, a second run compared),
on 127.0.0.1 unless asked otherwise."""

from __future__ import annotations

import os
from typing import Any, Literal

from cifarlab.commands.parsing import CHECKPOINT_DATA, EvalData, command_parser, parse
from cifarlab.errors import CifarlabError, needs_extra


def app(ckpt: str, data: EvalData = CHECKPOINT_DATA, host: str = "127.0.0.1", port: int = 7860,
        compare: str | None = None, projection: Literal["tsne", "pca"] = "tsne",
        ensemble: list[str] | None = None) -> None:
    """Serve the Grad-CAM web app for a checkpoint.

    Args:
        ckpt: A checkpoint written by `cifarlab fit` (`--ckpt A B C`: A, with B and C as the ensemble).
        data: The images the app shows.
        host: Interface to bind (0.0.0.0 exposes it to the network; default $GRADIO_SERVER_NAME or 127.0.0.1).
        port: Port (default $GRADIO_SERVER_PORT or 7860).
        compare: A second checkpoint (same classes): adds a Compare tab (per-class accuracy, the images one gets
            right and the other wrong, both CAMs).
        projection: How the embedding map is drawn (t-SNE: clearer clusters, ~30 s once per checkpoint).
        ensemble: More checkpoints of the same classes: the likely label errors are ranked from the mean of all
            their test probabilities (more reliable than one run's); everything else shows the first checkpoint.
    """
    with needs_extra("app"):
        from cifarlab.app import CifarApp, launch  # gradio: an optional extra

    page = CifarApp(ckpt, data.root, data.source, compare=compare, projection=projection, ensemble=ensemble or [])
    print(f"cifarlab app: http://{host}:{port}  (Ctrl-C to stop)")
    launch(page, host, port, block=True)


def app_options(argv: list[str]) -> dict[str, Any]:
    """``cifarlab app``'s options. Gradio's own variables (GRADIO_SERVER_NAME, GRADIO_SERVER_PORT) set the defaults,
    as for any Gradio app; the flags win over them."""
    port = os.environ.get("GRADIO_SERVER_PORT", "7860")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise CifarlabError(f"GRADIO_SERVER_PORT={port!r} is not a port number: set it to 1-65535 or unset it")
    parser = command_parser(app, "cifarlab app")
    parser.set_defaults({"host": os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), "port": int(port)})
    return parse(parser, argv)


def main(argv: list[str]) -> None:
    app(**app_options(argv))
