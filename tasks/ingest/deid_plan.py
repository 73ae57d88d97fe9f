"""Compiled deid recipes: what deid's ``DicomParser`` does to a dataset, recorded once per dataset
structure and replayed directly with pydicom.

Why this is exact. Applied to a dataset, deid (0.4.x) first removes private elements, then flattens
every remaining element (file meta and nested sequence items included) into fields, and resolves each
recipe line's field expression (keyword, tag, ``startswith:``, ``contains:``, ``select:VR:``, ...)
against those fields. Every decision in that resolution reads only an element's path, tag, keyword,
name and VR, never its value, so *which* elements are removed, blanked, replaced or added, in which
order, is a function of the dataset's structure. What depends on values is only *what is written*,
and that comes from the recipe's values and ``func:`` hooks, which the replay calls exactly as deid
does (through deid's own ``parse_value``, in the same order, with the same arguments).

So a plan is derived by deid itself: on the first dataset of a structure, a ``DicomParser`` subclass
does the real work (its output is the result) and records every mutation it makes. The plan is then
checked once on a pristine copy of that same dataset: the replay must give an equal dataset and the
same sequence of hook results, otherwise the structure is marked unplannable and always goes to deid.
During a replay, a hook result that differs from the recording in a way that changes what deid would
do (a value of None, which deid skips) raises ``PlanMismatch``, and the caller starts over with deid.

Recipes whose meaning depends on values (``values:``/``fields:`` lists, JITTER, REMOVE with a filter
value) are not compiled: ``RecipePlanner.plannable`` is False and every dataset goes to deid.

Plans can also be shared between processes and runs through a ``PlanStore``: one small JSON file per
structure, ``<directory>/<recipe sha256[:16]>/<signature hash>.json``, written atomically and read on
an in-memory miss. A stored plan holds structure only (tags, item indexes, VRs, field paths), the
recipe's actions and values, hook names, and per write one bit (whether deid wrote a value): never a
value taken from a dataset. Keyed by the recipe file's sha256 (and checked against the format and the
deid and pydicom versions), so an edited recipe or another deid never reuses old plans; an unreadable
or foreign file is ignored and rewritten. The store directory must be as trusted as the recipe itself.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import lru_cache
from importlib.metadata import version as _version
from pathlib import Path

import deid.dicom.parser as _deid_parser
from deid.config import DeidRecipe
from deid.dicom.actions import deid_funcs as DEID_FUNCS
from deid.dicom.fields import DicomField, _get_fields_inner
from deid.dicom.parser import DicomParser
from deid.dicom.tags import add_tag, get_private, get_tag
from deid.utils import parse_value
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

log = logging.getLogger(__name__)

MAX_PLANS = 1024  # structures kept per recipe (one device model and protocol gives a handful)

_REMOVE, _BLANK, _WRITE = 0, 1, 2
_FUNCTION_VALUE = re.compile(r"^(func|deid_func):", re.IGNORECASE)
_PARENTHESES_TAG = re.compile(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)")
_BARE_HEX_TAG = re.compile(r"[0-9A-Fa-f]{8}")
_UNPLANNABLE = None  # cached for a structure whose recorded plan did not reproduce deid


class PlanMismatch(RuntimeError):
    """A replay met a value that would make deid act differently from the recording."""


@dataclass(frozen=True)
class _Write:
    """One ``DicomParser.add_field`` call (REPLACE of a found field, or ADD)."""

    spec: str                      # the recipe value: "func:dax_uid", "YES", ...
    field_name: str                # DicomField.name for REPLACE, the recipe field text for ADD
    field_uid: str | None          # DicomField.uid for REPLACE; None when deid passed a string (ADD)
    filemeta: bool                 # the element lives in (or goes to) the file meta
    element_keys: tuple | None     # path from the root to the existing element; None: a new element
    new_tag: int | None            # tag and VR of a new element (deid's dictionary lookup)
    new_vr: str | None
    target_keys: tuple             # where deid's update_dicom stores the element
    value_given: bool              # parse_value returned something other than None
    tag_known: bool                # deid found a tag for the name (else it skips the write)


@dataclass
class Plan:
    """The mutations deid made to one structure, in order."""

    steps: list = field(default_factory=list)


@dataclass
class PlanStats:
    hits: int = 0
    misses: int = 0           # new structures: deid ran (and recorded)
    unplannable: int = 0      # datasets of a structure whose plan failed its check: deid ran
    mismatches: int = 0       # replays abandoned for deid (PlanMismatch)
    loaded: int = 0           # plans (or unplannable marks) read from the PlanStore on an in-memory miss

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses + self.unplannable + self.mismatches
        return self.hits / total if total else 0.0


# --- structure signature ----------------------------------------------------------------------------

def structure_signature(ds: Dataset) -> tuple:
    """Everything deid's field expansion reads, for every element deid would see: per element its tag
    and VR (keyword and name follow from the tag; a private element's name also from its creator),
    sequences with their items in order; the file meta likewise. Values are left out."""
    meta = ds.get("file_meta")
    meta_signature = (type(meta).__name__, _attrs(meta), _items(meta)) if meta is not None else None
    return (type(ds).__name__, _attrs(ds), _items(ds), meta_signature)


def _attrs(ds: Dataset) -> tuple:
    # deid names fields after a dataset's own ``prefix``/``uid`` attributes when they are set
    return (getattr(ds, "prefix", None), getattr(ds, "uid", None))


def _items(ds: Dataset) -> tuple:
    out = []
    for elem in ds:
        value = elem.value
        if isinstance(value, Sequence):
            out.append((elem.tag, elem.VR, tuple(
                _items(item) if isinstance(item, Dataset) else (type(item).__name__,) for item in value)))
        elif elem.tag.group & 1:
            out.append((elem.tag, elem.VR, elem.private_creator))
        else:
            out.append((elem.tag, elem.VR))
    return tuple(out)


# --- paths as deid resolves them -------------------------------------------------------------------

def _uid_keys(uid: str) -> tuple:
    """A deid field uid ("(0008,1115)__0__(0020,000E)") as pydicom keys (tags and item indexes)."""
    keys = []
    for part in uid.split("__"):
        if "(" in part or ")" in part:
            group, element = (x.strip() for x in re.sub("[()]", "", part).split(","))
            keys.append(Tag(int(group, 16), int(element, 16)))
        else:
            keys.append(int(part))
    return tuple(keys)


def _parent_keys(uid: str, desired) -> tuple:
    """The keys ``DicomParser.get_nested_field`` follows to the parent of ``desired`` (it skips any
    path component equal to the desired tag)."""
    return tuple(k for k in _uid_keys(uid) if not isinstance(k, BaseTag) or k != desired)


def _parse_tag_string(text: str):
    """``DicomParser.add_field``'s nested parse_tag_string, verbatim in behaviour."""
    if text.startswith("("):
        match = _PARENTHESES_TAG.match(text)
        return int(f"0x{match.group(1)}{match.group(2)}", base=16)
    try:
        if _BARE_HEX_TAG.match(text):
            return int(f"0x{text}", base=16)
        return int(text)
    except ValueError:
        return text


def _follow(root, keys):
    node = root
    for key in keys:
        node = node[key]
    return node


# --- recording: deid does the work and reports it ---------------------------------------------------

def _logging_hooks(hooks: dict, calls: list) -> dict:
    """Hooks that append (name, result) to ``calls`` before returning the result."""
    def wrap(name, function):
        def hook(*args, **kwargs):
            result = function(*args, **kwargs)
            calls.append((name, result))
            return result
        return hook
    return {name: wrap(name, function) if callable(function) else function for name, function in hooks.items()}


class _RecordingParser(DicomParser):
    """A DicomParser that records each mutation it makes to the dataset, in order."""

    def __init__(self, dicom, recipe: DeidRecipe, hooks: dict, calls: list) -> None:
        super().__init__(dicom, recipe=recipe)
        self.calls = calls
        self.deid_funcs = _logging_hooks(DEID_FUNCS, calls)
        for name, function in _logging_hooks(hooks, calls).items():
            self.define(name, function)
        self.plan = Plan()

    def delete_field(self, field):
        parent, desired = self.get_nested_field(field, return_parent=True)
        if parent and desired in parent:
            self.plan.steps.append((_REMOVE, field.is_filemeta, _parent_keys(field.uid, desired), desired))
        super().delete_field(field)

    def blank_field(self, field):
        parent, desired = self.get_nested_field(field, return_parent=True)
        if parent and desired in parent:
            self.plan.steps.append((_BLANK, field.is_filemeta, _parent_keys(field.uid, desired), desired))
        super().blank_field(field)

    def add_field(self, field, value):
        # What deid will decide, worked out before it mutates anything (mirrors add_field).
        is_field = isinstance(field, DicomField)
        name = (field.element.keyword or field.stripped_tag) if is_field else field
        tag = _known_tag(name) or add_tag(name)
        uid = (getattr(field, "uid", None) or str(tag["tag"])) if tag else None
        existing = self.fields[uid] if uid is not None and uid in self.fields else None
        if _FUNCTION_VALUE.search(value) is None:  # plain text or var: no side effects, evaluate now
            given = parse_value(item=self.lookup, value=value, field=field, dicom=self.dicom,
                                funcs=self.deid_funcs) is not None
        calls_before = len(self.calls)
        super().add_field(field, value)
        if _FUNCTION_VALUE.search(value) is not None:
            given = len(self.calls) > calls_before and self.calls[-1][1] is not None

        full_path = field.uid if hasattr(field, "uid") else field
        if existing is not None:
            filemeta, new_tag, new_vr = existing.is_filemeta, None, None
            element_keys = _uid_keys(existing.uid)
        else:
            new_tag = int(tag["tag"]) if tag else None
            new_vr = tag["VR"] if tag else None
            filemeta = bool(tag) and str(Tag(new_tag)).startswith("(0002")
            element_keys = None
        self.plan.steps.append((_WRITE, _Write(
            spec=value,
            field_name=field.name if is_field else field,
            field_uid=field.uid if is_field else None,
            filemeta=filemeta,
            element_keys=element_keys,
            new_tag=new_tag,
            new_vr=new_vr,
            target_keys=tuple(_parse_tag_string(part) for part in full_path.split("__")),
            value_given=given,
            tag_known=bool(tag),
        )))


@lru_cache(maxsize=4096)
def _known_tag(name: str) -> dict | None:
    """deid's ``get_tag`` (a scan of the whole DICOM dictionary), remembered; read-only use."""
    return get_tag(name)


# deid's own DicomParser.add_field looks up every keyword it writes with the same ``get_tag``: about
# 0.4 ms a call, a sixth of deid's time on a dataset (profiled). The parser gets the remembered lookup: the same
# answers (a pure function of the keyword and pydicom's dictionary; deid only reads the dict returned).
_deid_parser.get_tag = _known_tag


def _remove_private(ds: Dataset) -> None:
    """``DicomParser.remove_private``, on a dataset."""
    try:
        ds.remove_private_tags()
    except Exception:
        for element in get_private(ds):
            del ds[element.tag]


# --- replay -----------------------------------------------------------------------------------------

def replay(plan: Plan, dicom: Dataset, hooks: dict, funcs: dict = DEID_FUNCS) -> None:
    """Apply ``plan`` to ``dicom`` (already stripped of private elements), calling ``hooks`` as deid
    would. Raises PlanMismatch when a value would make deid act otherwise."""
    for step in plan.steps:
        kind = step[0]
        if kind == _WRITE:
            _replay_write(step[1], dicom, hooks, funcs)
            continue
        _, filemeta, parent_keys, desired = step
        try:
            parent = _follow(dicom.file_meta if filemeta else dicom, parent_keys)
            if kind == _REMOVE:
                del parent[desired]
            else:
                parent[desired].value = None
        except (KeyError, IndexError, AttributeError, TypeError) as error:
            raise PlanMismatch(f"no element at {parent_keys} {desired}") from error


def _replay_write(write: _Write, dicom: Dataset, hooks: dict, funcs: dict) -> None:
    root = dicom.file_meta if write.filemeta else dicom
    element = None
    try:
        if write.element_keys is not None:
            element = _follow(root, write.element_keys)
    except (KeyError, IndexError, AttributeError, TypeError) as error:
        raise PlanMismatch(f"no element at {write.element_keys}") from error
    if write.field_uid is not None:
        if element is None:
            element = _follow(root, _uid_keys(write.field_uid))
        argument = DicomField(element, write.field_name, write.field_uid, write.filemeta)
    else:
        argument = write.field_name
    value = parse_value(item=hooks, value=write.spec, field=argument, dicom=dicom, funcs=funcs)
    if (value is not None) != write.value_given:
        raise PlanMismatch(f"{write.spec} gave {'None' if value is None else 'a value'}, unlike the recording")
    if value is None or not write.tag_known:
        return
    if write.element_keys is not None:
        element.value = value
    else:
        element = DataElement(write.new_tag, write.new_vr, value)
    if write.filemeta:
        dicom.file_meta.add(element)
    else:
        _follow(dicom, write.target_keys[:-1])[write.target_keys[-1]] = element


# --- the planner -------------------------------------------------------------------------------------

def plannable(recipe: DeidRecipe) -> bool:
    """Whether every header action of ``recipe`` is decided by structure alone."""
    if recipe.deid is None or recipe.has_values_lists() or recipe.has_fields_lists():
        return False
    for action in recipe.get_actions():
        kind, target = action.get("action"), action.get("field") or ""
        if kind == "JITTER" or (kind == "REMOVE" and action.get("value") is not None):
            return False
        if re.search("^(values|fields)", target):
            return False
    return True


def _same(a: Dataset, b: Dataset) -> bool:
    meta_a, meta_b = a.get("file_meta"), b.get("file_meta")
    return a == b and (meta_a is None) == (meta_b is None) and (meta_a is None or meta_a == meta_b)


class RecipePlanner:
    """Plans of one parsed deid recipe, by structure signature (least recently used dropped first)."""

    def __init__(self, recipe: DeidRecipe, max_plans: int = MAX_PLANS, store: PlanStore | None = None) -> None:
        self.recipe = recipe
        self.plannable = plannable(recipe)
        self.max_plans = max_plans
        self.store = store
        self.stats = PlanStats()
        self._plans: OrderedDict[tuple, Plan | None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self.stats = PlanStats()

    def run_deid(self, dicom: Dataset, hooks: dict) -> Dataset:
        """deid's own parser on ``dicom`` (in place), as the reference engine does it."""
        parser = DicomParser(dicom, recipe=self.recipe)
        for name, function in hooks.items():
            parser.define(name, function)
        try:
            parser.parse(remove_private=True)
        finally:
            _get_fields_inner.cache_clear()  # deid caches every parsed dataset forever (memory leak)
        return parser.dicom

    def apply(self, dicom: Dataset, hooks: dict, spare_hooks: Callable[[], dict]) -> str:
        """De-identify ``dicom`` in place with the recipe's header actions, as deid's
        ``DicomParser(dicom, recipe).parse(remove_private=True)`` would. ``hooks`` are the ``func:``
        hooks; ``spare_hooks()`` makes an independent set, used only to check a new plan.
        Returns how: "hit", "miss", "unplannable". PlanMismatch leaves ``dicom`` half done: start over
        on a fresh copy with ``run_deid``."""
        if not self.plannable:
            self.run_deid(dicom, hooks)
            return "unplannable"
        _remove_private(dicom)
        signature = structure_signature(dicom)
        with self._lock:
            known = signature in self._plans
            plan = self._plans.get(signature)
            if known:
                self._plans.move_to_end(signature)
        if not known and self.store is not None:
            known, plan = self.store.load(signature)
            if known:
                self._remember(signature, plan, loaded=True)
                # what a miss would have done: drop deid's dataset cache (here possibly inherited, in a
                # forked worker, from a parent that ran deid; a worker that never misses never clears it)
                _get_fields_inner.cache_clear()
        if known and plan is not _UNPLANNABLE:
            try:
                replay(plan, dicom, hooks)
            except PlanMismatch:
                with self._lock:
                    self.stats.mismatches += 1
                raise
            with self._lock:
                self.stats.hits += 1
            return "hit"
        if known:
            with self._lock:
                self.stats.unplannable += 1
            self.run_deid(dicom, hooks)
            return "unplannable"
        plan = self._record(dicom, hooks, spare_hooks)
        self._remember(signature, plan)
        if self.store is not None:
            self.store.save(signature, plan)
        return "miss"

    def _remember(self, signature: tuple, plan: Plan | None, loaded: bool = False) -> None:
        with self._lock:
            if loaded:
                self.stats.loaded += 1
            else:
                self.stats.misses += 1
            self._plans[signature] = plan
            while len(self._plans) > self.max_plans:
                self._plans.popitem(last=False)

    def _record(self, dicom: Dataset, hooks: dict, spare_hooks: Callable[[], dict]) -> Plan | None:
        """Run deid on ``dicom`` recording its plan, then check the plan on a pristine copy."""
        pristine = copy.deepcopy(dicom)
        calls: list = []
        parser = _RecordingParser(dicom, self.recipe, hooks, calls)
        try:
            parser.parse(remove_private=True)
        finally:
            _get_fields_inner.cache_clear()
        replayed: list = []
        try:
            replay(parser.plan, pristine, _logging_hooks(spare_hooks(), replayed),
                   _logging_hooks(DEID_FUNCS, replayed))
            ok = replayed == calls and _same(dicom, pristine)
        except Exception:  # any failure of the check means: do not trust the plan
            log.exception("deid plan check failed")
            ok = False
        if not ok:
            log.warning("deid plan does not reproduce deid for a structure; deid will handle it")
            return _UNPLANNABLE
        return parser.plan


# --- the on-disk store -----------------------------------------------------------------------------

STORE_FORMAT = 1
_VERSIONS = {"deid": _version("deid"), "pydicom": _version("pydicom")}  # whose behaviour a plan records
_WRITE_FIELDS = tuple(f.name for f in fields(_Write))
_STEP_CODES = {_REMOVE: "remove", _BLANK: "blank"}
_STEP_KINDS = {code: kind for kind, code in _STEP_CODES.items()}


def signature_hash(signature: tuple) -> str:
    """A stable name for a structure signature (its repr holds tags, VRs and type names only)."""
    return hashlib.sha256(repr(signature).encode()).hexdigest()[:32]


class PlanStore:
    """Plans of one recipe on disk, shared by every process and run using ``directory``:
    ``directory/<recipe sha256[:16]>/<signature hash>.json``. A file is written whole (a temporary file
    then ``os.replace``), so readers see an old file, a new file or none. Every failure to read or
    write is logged and ignored: the planner then records the plan with deid as if nothing was stored."""

    def __init__(self, directory: str | os.PathLike, recipe_sha256: str) -> None:
        self.recipe_sha256 = recipe_sha256
        self.directory = Path(directory) / recipe_sha256[:16]
        self._header = {"format": STORE_FORMAT, **_VERSIONS, "recipe_sha256": recipe_sha256}

    def path(self, signature: tuple) -> Path:
        return self.directory / f"{signature_hash(signature)}.json"

    def load(self, signature: tuple) -> tuple[bool, Plan | None]:
        """(True, plan or _UNPLANNABLE) when a valid file is stored for ``signature``, else (False, None)."""
        path = self.path(signature)
        try:
            document = json.loads(path.read_bytes())
        except FileNotFoundError:
            return False, None
        except Exception:  # noqa: BLE001 - unreadable: treat as absent, it is rewritten after deid
            log.warning("ignoring an unreadable deid plan file %s", path.name)
            return False, None
        try:
            if not isinstance(document, dict) or any(document.get(k) != v for k, v in self._header.items()) \
                    or document.get("signature") != signature_hash(signature):
                raise ValueError("foreign or stale plan file")
            if document.get("unplannable") is True and document.get("steps") is None:
                return True, _UNPLANNABLE
            return True, Plan(steps=[_decode_step(step) for step in _list(document["steps"])])
        except Exception:  # noqa: BLE001
            log.warning("ignoring an invalid deid plan file %s", path.name)
            return False, None

    def save(self, signature: tuple, plan: Plan | None) -> None:
        document = dict(self._header, signature=signature_hash(signature))
        if plan is _UNPLANNABLE:
            document.update(unplannable=True, steps=None)
        else:
            document.update(unplannable=False, steps=[_encode_step(step) for step in plan.steps])
        data = json.dumps(document, separators=(",", ":")).encode()
        target = self.path(signature)
        temporary = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(temporary, target)
            temporary = None
        except OSError:
            log.warning("could not store a deid plan in %s", self.directory, exc_info=True)
        finally:
            if temporary is not None:
                try:
                    os.unlink(temporary)
                except OSError:
                    pass


# What a stored plan may hold is spelled out field by field: structure (tags, item indexes, VRs, field
# paths made of keywords and tags), the recipe's text and booleans. The in-memory Plan holds nothing
# else (hook results seen while recording are checked and dropped in _record), and the encoding below
# refuses any other type, so a value from a dataset cannot slip into a file.

def _encode_key(key):
    if isinstance(key, BaseTag):
        return {"tag": int(key)}
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"unexpected plan key {type(key).__name__}")
    return int(key) if isinstance(key, int) else str(key)


def _decode_key(key):
    if isinstance(key, dict) and set(key) == {"tag"} and _is_int(key["tag"]):
        return Tag(key["tag"])
    if _is_int(key) or isinstance(key, str):
        return key
    raise ValueError("invalid plan key")


def _encode_keys(keys):
    return None if keys is None else [_encode_key(k) for k in keys]


def _decode_keys(keys):
    return None if keys is None else tuple(_decode_key(k) for k in _list(keys))


def _encode_step(step) -> dict:
    if step[0] == _WRITE:
        write = step[1]
        return {"kind": "write", "spec": str(write.spec), "field_name": str(write.field_name),
                "field_uid": None if write.field_uid is None else str(write.field_uid),
                "filemeta": bool(write.filemeta), "element_keys": _encode_keys(write.element_keys),
                "new_tag": None if write.new_tag is None else int(write.new_tag),
                "new_vr": None if write.new_vr is None else str(write.new_vr),
                "target_keys": _encode_keys(write.target_keys),
                "value_given": bool(write.value_given), "tag_known": bool(write.tag_known)}
    kind, filemeta, parent_keys, desired = step
    return {"kind": _STEP_CODES[kind], "filemeta": bool(filemeta), "parent_keys": _encode_keys(parent_keys),
            "desired": _encode_key(desired)}


def _decode_step(step):
    if not isinstance(step, dict):
        raise ValueError("invalid plan step")
    if step.get("kind") == "write":
        if set(step) != {"kind", *_WRITE_FIELDS}:
            raise ValueError("invalid write step")
        write = _Write(
            spec=_str(step["spec"]), field_name=_str(step["field_name"]),
            field_uid=_optional(step["field_uid"], _str), filemeta=_bool(step["filemeta"]),
            element_keys=_decode_keys(step["element_keys"]),
            new_tag=_optional(step["new_tag"], _int), new_vr=_optional(step["new_vr"], _str),
            target_keys=_decode_keys(step["target_keys"]),
            value_given=_bool(step["value_given"]), tag_known=_bool(step["tag_known"]))
        if write.target_keys is None or not write.target_keys:
            raise ValueError("invalid write step")
        return (_WRITE, write)
    if set(step) != {"kind", "filemeta", "parent_keys", "desired"} or step["kind"] not in _STEP_KINDS:
        raise ValueError("invalid plan step")
    return (_STEP_KINDS[step["kind"]], _bool(step["filemeta"]), _decode_keys(_list(step["parent_keys"])),
            _decode_key(step["desired"]))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value) -> int:
    if not _is_int(value):
        raise ValueError("expected an integer")
    return value


def _str(value) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _bool(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected a boolean")
    return value


def _list(value) -> list:
    if not isinstance(value, list):
        raise ValueError("expected a list")
    return value


def _optional(value, check):
    return None if value is None else check(value)


def recipe_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
