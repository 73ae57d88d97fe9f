"""What DAX ships besides code, as package data found in any install: the de-identification recipe
(``deid/``) and the named configs of pretraining (``pretrain/``) and of the heads (``heads/``)."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["SHIPPED", "find_config"]

SHIPPED = Path(str(files(__name__)))


def find_config(kind: str, name_or_path: str, what: str) -> Path:
    """``deployments/<kind>/<name>.yaml`` for a bare name, else the YAML file as given; a missing one raises
    FileNotFoundError naming the shipped configs (``what`` says which, e.g. 'pretraining config')."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SHIPPED / kind / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (SHIPPED / kind).glob("*.yaml")))
        raise FileNotFoundError(f"no {what} {name_or_path!r} (named configs: {known})")
    return path
