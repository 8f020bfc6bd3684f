"""The docs cannot drift from the code: every `cifarlab ...` command in the README and docs/ parses, and every recipe
and CAM layer they name exists.

Commands come from the ```bash blocks of README.md and docs/*.md. Each is dry-parsed in-process,
`cifarlab.cli.main(argv + ["--print_config"])`, which parses every flag and then exits 0 without reading data or
checkpoints: a renamed flag, recipe or subcommand fails here.
"""
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "src" / "cifarlab" / "configs"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Commands whose `--print_config` is not a dry parse yet (none today); the reason shows in the test report.
NOT_DRY_YET: dict[str, str] = {}
# Commands whose options are their own (a checkpoint, not a recipe): a `--config FILE` of theirs holds `ckpt: PATH`.
CKPT_COMMANDS = {"app", "predict", "report", "export"}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh|console)\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """The `cifarlab` command lines of a shell block as argv lists (without `cifarlab`): continuation lines joined,
    comments dropped, set-up prefixes (`python3 -m venv ... &&`, `srun`, `time`, a `$ ` prompt) dropped."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            while words and words[0] in ("$", "srun", "time"):
                words = words[1:]
            if words[:1] == ["cifarlab"]:
                found.append(words[1:])
    return found


def doc_commands() -> list[tuple[str, list[str]]]:
    out, seen = [], set()
    for path in DOCS:
        for block in bash_blocks(path.read_text()):
            for argv in commands(block):
                if tuple(argv) not in seen:
                    seen.add(tuple(argv))
                    out.append((path.name, argv))
    return out


def is_recipe(value: str) -> bool:
    """`fast` or `configs/fast.yaml`: a packaged recipe (as `cifarlab.recipes` resolves it), not a file of one's own."""
    return (re.fullmatch(r"(configs/)?[\w-]+(\.yaml)?", value) is not None and not value.isupper()
            and "/" not in value.replace("configs/", ""))


def recipe_name(value: str) -> str:
    return Path(value).name.removesuffix(".yaml")


def _materialize(argv: list[str], tmp: Path) -> None:
    """Write a file for each `--config FILE` that is not a recipe (a run's config.yaml, lr-find's suggested_lr.yaml,
    a YAML of a checkpoint command's options), so that the parse reads a real file."""
    for flag, value in zip(argv, argv[1:]):
        if flag == "--config" and not is_recipe(value):
            path = tmp / value
            path.parent.mkdir(parents=True, exist_ok=True)
            text = "ckpt: model.ckpt\n" if argv[0] in CKPT_COMMANDS else "model:\n  optimizer:\n    lr: 0.001\n"
            path.write_text(text)


COMMANDS = doc_commands()


def test_docs_have_commands():
    names = {argv[0] for _, argv in COMMANDS}
    assert {"fit", "test", "app", "predict", "report", "audit"} <= names, names


@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS],
                         ids=[f"{doc}: cifarlab {' '.join(argv)}"[:120] for doc, argv in COMMANDS])
def test_command_parses(argv, tmp_path, monkeypatch, request):  # fast: conftest memoizes the docstrings
    from cifarlab.cli import main

    if argv[0] in NOT_DRY_YET:
        request.applymarker(pytest.mark.xfail(reason=NOT_DRY_YET[argv[0]], strict=False))
    monkeypatch.chdir(tmp_path)  # recipes resolve from the package, as outside a checkout; nothing is written here
    _materialize(argv, tmp_path)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
        main([*argv, "--print_config"])
    assert stop.value.code == 0, f"`cifarlab {' '.join(argv)}` does not parse:\n{err.getvalue()[-2000:]}"


def test_recipes_named_exist():
    """Every `--config NAME`, `configs/NAME.yaml` and `` `NAME.yaml` `` the docs name is a packaged recipe."""
    recipes = {p.stem for p in RECIPES.glob("*.yaml")}
    named = set()
    for path in DOCS:
        text = path.read_text()
        named |= {(path.name, m) for m in re.findall(r"configs/([\w-]+)\.yaml", text)}
        named |= {(path.name, m) for m in re.findall(r"--config[ =]([\w-]+)\b(?![./])", text)}
        named |= {(path.name, m) for m in re.findall(r"`([\w-]+)\.yaml`", text) if m not in ("config", "suggested_lr")}
    missing = sorted((doc, name) for doc, name in named if name not in recipes and name.upper() != name)
    assert not missing, f"recipes named in the docs but not in src/cifarlab/configs/: {missing}"


def test_every_recipe_is_documented():
    text = (ROOT / "docs" / "recipes.md").read_text()
    undocumented = [p.stem for p in RECIPES.glob("*.yaml") if f"`{p.stem}.yaml`" not in text]
    assert not undocumented, f"docs/recipes.md does not describe {undocumented}"


def test_cam_layers_named_exist():
    """Every CAM layer the docs name (`block3 (3x3)`, "layer2 (8x8)", `--layer block2`) is one that
    `cifarlab.cam.target_layers` offers for some network of `cifarlab.models.ARCHITECTURES`."""
    from cifarlab.cam import target_layers
    from cifarlab.models import ARCHITECTURES, build_model

    layers = {name for arch in ARCHITECTURES for name in target_layers(build_model(arch, num_classes=10))}
    bare = {name.split(" (")[0] for name in layers}
    named = []
    for path in DOCS:
        text = path.read_text()
        named += [(path.name, m, layers) for m in re.findall(r"[`\"']([\w.]+ \(\d+x\d+\))[`\"']", text)]
        named += [(path.name, m, bare) for m in re.findall(r"--layers? [`\"']?([\w.]+)", text)]
    assert named, "the docs name no CAM layer: this check would check nothing"
    missing = sorted({(doc, name) for doc, name, known in named if name not in known})
    assert not missing, f"CAM layers named in the docs that no network has (they are {sorted(layers)}): {missing}"
