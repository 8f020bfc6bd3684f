"""The recipes that ship inside the package (``src/cifarlab/configs/*.yaml``), found by name or by path."""

from __future__ import annotations

from pathlib import Path

from cifarlab.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent / "configs"


def packaged_recipes() -> list[str]:
    """Names of the packaged recipes (``fast``, ``seed``, ...)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(value: str) -> str:
    """A ``--config`` value as a file: an existing path as given; else a packaged recipe by name (``fast``,
    ``fast.yaml``) or by a path whose file name is one (``configs/fast.yaml`` run outside a checkout)."""
    if Path(value).expanduser().is_file() or value.lstrip().startswith(("{", "[")):  # a file, or inline YAML
        return value
    stem = Path(value).name.removesuffix(".yaml").removesuffix(".yml")
    packaged = RECIPES_DIR / f"{stem}.yaml"
    if packaged.is_file():
        return str(packaged)
    raise ConfigError(f"no recipe file {value!r} and no packaged recipe named {stem!r}: pass a YAML path or one of "
                      f"{', '.join(packaged_recipes())}")


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config``/``-c`` value resolved by ``resolve_recipe``."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            out += [arg, resolve_recipe(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + resolve_recipe(arg.split("=", 1)[1])
        out.append(arg)
        i += 1
    return out
