"""What DAX ships besides code, as package data found in any install: the de-identification recipe
(``deid/``) and the named configs of pretraining (``pretrain/``) and of the heads (``heads/``)."""
from __future__ import annotations

import dataclasses
from importlib.resources import files
from pathlib import Path

__all__ = ["SHIPPED", "checked_numbers", "find_config", "with_setting"]

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


def checked_numbers(cls: type, values: dict, prefix: str = "") -> dict:
    """``values`` for the dataclass ``cls`` (a config) with its number settings checked: PyYAML reads ``1e-5`` (no
    dot) as a string, so such a string becomes a float; anything else that is not a number raises ValueError
    naming the setting. Fields typed ``int`` or ``float`` (optionally ``| None``) are checked; ``cls`` must use
    string annotations (``from __future__ import annotations``)."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    checked = dict(values)
    for key, value in values.items():
        kind = kinds.get(key, "")
        if not kind.startswith(("float", "int")) or (value is None and kind.endswith("None")):
            continue
        if isinstance(value, str) and kind.startswith("float"):
            try:
                value = checked[key] = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (kind.startswith("int") and not isinstance(value, int)):
            raise ValueError(f"{prefix}{key} must be {'a whole number' if kind.startswith('int') else 'a number'},"
                             f" not {value!r}")
    return checked


def with_setting(overrides: dict | None, key: str, value, option: str | None = None,
                 override: str | None = None) -> dict:
    """``overrides`` with ``key`` set to ``value``, for a setting given both as its own option and as a
    ``key=...`` override: ``value`` None (the option left out) keeps the override's; both given must agree, else
    ValueError naming both as the caller spells them (``option``, default ``key``; ``override``, default 'the
    override key'): which one wins is not a guess. ``overrides`` itself is not changed."""
    merged = dict(overrides or {})
    if value is not None:
        if merged.get(key, value) != value:
            raise ValueError(f"{option or key} {value} and {override or 'the override ' + key}={merged[key]} "
                             "disagree: give one")
        merged[key] = value
    return merged
