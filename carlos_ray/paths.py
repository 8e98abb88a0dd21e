"""The one resolver of configuration files (configs, prompt sets) named by relative paths like `conf/tiny.yaml`.

A path is tried as given, then inside the checkout this package runs from (`<repo>/conf/...`), then inside the
installed package (`carlos_ray/conf/...`, which the wheel build copies from the repository's `conf/`), so the
same names work from a checkout, an editable install and a plain `pip install .` run from any directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout, when the package runs from one


def _roots() -> list[Path]:
    """Where `conf/...` names resolve: the checkout, then the packaged copy."""
    packaged = Path(str(resources.files("carlos_ray"))) / "conf"
    return [REPO_ROOT / "conf", packaged]


def conf_candidates(path: str | Path) -> list[Path]:
    """Every place `path` is looked for, in order."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return [given]
    inner = Path(*given.parts[1:]) if given.parts[:1] == ("conf",) and len(given.parts) > 1 else given
    out = [given]
    for root in _roots():
        out += [root / inner]
    return list(dict.fromkeys(out))


def find_conf_file(path: str | Path) -> Path | None:
    """The first existing file among :func:`conf_candidates`, or None."""
    return next((c for c in conf_candidates(path) if c.is_file()), None)


def resolve_conf_path(path: str | Path) -> Path:
    """Like :func:`find_conf_file`, but a missing file is a FileNotFoundError naming every place tried."""
    found = find_conf_file(path)
    if found is None:
        raise FileNotFoundError(f"config file {str(path)!r} not found; tried: {[str(c) for c in conf_candidates(path)]}")
    return found
