"""Planted-PHI search shared by the leak tests: the generator's phi.parquet rows are the oracle."""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

from tasks.synth.devices import DEVICE_MODELS

RETAINED_KINDS = {"sex", "age", "size", "weight", "time"}  # kept by the profile's options, by design


def phi_values(phi: list[dict]) -> set[str]:
    """Planted values to search for; generic words inside a kept device name (department 'RADIOLOGY'
    in 'Calderon Radiology Systems') are no evidence of a leak and are left out."""
    device_names = " ".join(f"{d.manufacturer} {d.model}" for d in DEVICE_MODELS).lower()
    values = set()
    for row in phi:
        if row["kind"] in RETAINED_KINDS:
            continue
        for value in str(row["value"]).split("\\"):
            value = value.strip()
            if len(value) >= 6 and value.lower() not in device_names:
                values.add(value)
                if "^" in value:
                    values.update(part for part in value.split("^") if len(part) >= 6)
    return values


# digits not inside a longer number, nor right after one's decimal point
_WHOLE_NUMBER = r"(?<![0-9])(?<![0-9]\.){}(?![0-9])"
# a run of hex digits and dashes with at least this many hex digits, letters among them, is a random
# identifier: a UUID (Prefect's runs, states, events), an MLflow run id, a sha256, a pseudonymous key
# (16 hex digits), or what is left of one in a database page's prefix-compressed index
_HEX_ID_DIGITS = 12
_HEX_OR_DASH = frozenset(b"0123456789abcdef-")
_HEX_LETTERS = frozenset(b"abcdef")
_HEX_DIGITS = frozenset(b"0123456789abcdef")


def _inside_hex_id(data: bytes, start: int, end: int) -> bool:
    """Whether ``data[start:end]`` lies in a hex identifier (``data`` lower-cased)."""
    while start > 0 and data[start - 1] in _HEX_OR_DASH:
        start -= 1
    while end < len(data) and data[end] in _HEX_OR_DASH:
        end += 1
    token = data[start:end]
    return len(token) - token.count(b"-") >= _HEX_ID_DIGITS and any(c in _HEX_LETTERS for c in token)


def _fused_to_hex_id(data: bytes, start: int, end: int) -> bool:
    """Whether the text ``data[start:end]`` begins or ends with hex letters that continue a hex identifier
    written right before or after it, with no separator: an SQLite index page stores an MLflow run id and
    its metric key back to back ('...5bcbcace' + 'linear_pooled_accuracy' holds 'celine')."""
    def is_id(token: bytes) -> bool:
        return len(token) >= _HEX_ID_DIGITS and any(c in _HEX_LETTERS for c in token)
    left, head = start, start
    while left > 0 and data[left - 1] in _HEX_DIGITS:
        left -= 1
    while head < end and data[head] in _HEX_DIGITS:
        head += 1
    right, tail = end, end
    while right < len(data) and data[right] in _HEX_DIGITS:
        right += 1
    while tail > start and data[tail - 1] in _HEX_DIGITS:
        tail -= 1
    return (left < start and is_id(data[left:head])) or (right > end and is_id(data[tail:right]))


def _found(pattern: re.Pattern, data: bytes, number: bool) -> bool:
    if not number:
        return any(not _fused_to_hex_id(data, m.start(), m.end()) for m in pattern.finditer(data))
    return any(not _inside_hex_id(data, m.start(), m.end()) for m in pattern.finditer(data))


def phi_hits(values: set[str], haystacks: dict[str, bytes]) -> list[tuple[str, str]]:
    """(where, value) for every planted value found, case-insensitively, in any haystack.

    A number counts as a whole number of its own only. Not inside a longer number, nor as the fraction
    part of another: a 6- or 8-digit record number may well occur in the digits of a float or as a
    timestamp's microseconds (run durations, Prefect's clocks: '21:14:26.888832'). Nor inside a random
    hex identifier: a test session's Prefect and MLflow stores hold some 600 distinct 6-digit runs in
    their UUIDs and ids ('...-e3469c455395', '...-b301473a9692'), new ones every session, which the
    small corpus's 24 six-digit study IDs meet by chance about once in 70 sessions. None of these is a
    leak; 'id888832' or 'pred_888832' still is. A name counts unless its leading or trailing hex letters
    continue such an identifier with no separator ('...5bcbcace' + 'linear' is no 'Celine'); 'id-celine',
    'celine.dcm' or 'run_celine' still is one."""
    patterns = []          # (the value's bytes, lower-cased; its pattern; whether it is a number)
    for v in values:
        literal = v.lower().encode()
        source = _WHOLE_NUMBER.format(re.escape(v)).encode() if v.isdigit() else re.escape(literal)
        patterns.append((literal, re.compile(source), v.isdigit()))
    hits = []
    for where, data in haystacks.items():
        lowered = data.lower()
        # the plain substring test first, the regex only where the value occurs: most values occur in no
        # file, and a regex scan is some 20 times slower (a number's pattern starts with a look-behind, so
        # re cannot skip ahead to its digits; 179 s against 8 s for 400 values in 20 MB of random bytes)
        hits += [(where, p.pattern.decode(errors="replace")) for literal, p, number in patterns
                 if literal in lowered and _found(p, lowered, number)]
    return hits


# a tensor's raw storage inside a torch.save zip (checkpoints, pickled MLflow models): numbers, no text
_TENSOR_STORAGE = re.compile(r"/data/\d+$")


def searchable_bytes(path: Path) -> bytes:
    """A file's bytes as the search reads them: a zip (torch checkpoints and pickled models) as its member
    names and members, raw tensor storages left out; a ``.npy`` array as its header; anything else whole.
    Searching hundreds of MB of float weights for names would cost minutes and could only find noise."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                return b"\n".join(name.encode() + b"\n" + (b"" if _TENSOR_STORAGE.search(name) else archive.read(name))
                                  for name in archive.namelist())
        except zipfile.BadZipFile:   # a zip signature by chance inside another format: read it whole
            pass
    with open(path, "rb") as file:
        return file.read(4096) if path.suffix == ".npy" else file.read()


def files_under(folder: Path, relative_to: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file's path (relative) and searchable bytes, as haystacks; folders named in ``skip`` left out."""
    stacks = {}
    for path in Path(folder).rglob("*"):
        if path.is_file() and not set(skip) & set(path.parts):
            name = path.relative_to(relative_to).as_posix()
            stacks[f"file {name}"] = name.encode() + searchable_bytes(path)
    return stacks
