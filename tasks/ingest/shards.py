"""WebDataset shards of normalized 16-bit X-ray frames: deterministic, atomic writing and reading back.

Writing (``ShardSink``) uses ``webdataset.ShardWriter`` (1.0.2) with three hooks it already offers:

- ``opener``: each shard is written to ``.{name}.tmp`` in the target directory through a file object
  that hashes the bytes as they go (no second read of a 1 GB shard for its sha256);
- ``post``: called after each shard's tar stream is closed; it fsyncs, closes and atomically renames
  the temporary file to ``{prefix}-{n:04d}.tar`` (``os.replace``), then records a ``ShardInfo``;
- ``TarWriter`` keyword arguments: ``mtime``, ``user``, ``group`` and ``mode`` pinned, because by
  default TarWriter stamps each member with ``time.time()`` (so two runs never match); uid/gid are
  left at tarfile's 0 and the format is USTAR. ``encoder=False``: we hand it bytes we encoded
  ourselves (its built-in image encoders go through 8-bit paths), ``verbose=0`` silences its prints.

Same samples in the same order give byte-identical shards, so a re-run after a crash rewrites the same
files. Rollover follows ShardWriter's rule: a new shard starts before a sample when the current one
holds ``max_samples`` samples or its payload (member bytes, without the 512-byte tar headers and
padding) has reached ``target_bytes``; so a shard's payload ends up at least ``target_bytes`` (unless
it is the last) and at most one sample larger. ShardWriter opens its first shard eagerly; a shard
with no sample is never renamed into place (no empty ``.tar``).

If the sink exits with an exception, the shard in progress is discarded (its temporary file is
deleted) and the shards already finished stay on disk, complete and valid (they are listed in
``ShardSink.finished``); the caller decides whether they are orphans. A crashed process can leave
``.*.tar.tmp`` files behind: ``remove_stale_temporaries`` clears them when no sink is writing there.
Shard names are ``{prefix}-{n:04d}.tar`` from 0 for every sink: give each concurrent writer its own
prefix (or directory); a re-run with the same prefix overwrites the same names with the same bytes.

Samples hold ``{key}.json`` (metadata, UTF-8, sorted keys, compact separators) and ``{key}.png``
(16-bit grayscale PNG written by Pillow from mode 'I;16') or ``{key}.npy`` (``numpy.save`` bytes).
Keys match ``^[A-Za-z0-9_-]+$``: WebDataset cuts the key at the first dot of a member name, so a
dotted key (a DICOM UID, say) would split into wrong samples.

Reading: ``decode_image`` (exact uint16 values back) and ``iter_shard``, a ``webdataset.WebDataset``
pipeline over one shard with ``image_handler`` in its decoder (WebDataset's own image decoders are
8-bit). The training loader can pass ``image_handler`` to its own ``.decode(...)``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tasks.fileio import fsync_directory

__all__ = [
    "KEY_PATTERN", "ShardInfo", "ShardSink", "decode_image", "encode_image", "encode_metadata", "image_handler",
    "iter_shard", "remove_stale_temporaries",
]

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
IMAGE_FORMATS = ("png", "npy")
DEFAULT_MAX_SAMPLES = 100_000        # ShardWriter's own default maxcount
PNG_COMPRESS_LEVEL = 1               # zlib level: fixed (determinism); 1 is ~3x faster than 6, ~10% larger
TAR_MTIME = 946_684_800              # 2000-01-01T00:00:00Z, for every member
TAR_USER = TAR_GROUP = "dax"
TAR_MODE = 0o444
_TEMP_PATTERN = re.compile(r"^\..+\.tar\.tmp$")


@dataclass(frozen=True)
class ShardInfo:
    name: str       # file name, e.g. "train-0003.tar"
    sha256: str     # hex digest of the finished file
    samples: int
    bytes: int      # file size


def _temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp")


class _HashingFile:
    """A write-only binary file that hashes and counts what goes through it."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb")
        self._hash = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self.bytes += view.nbytes
        return self._file.write(view)

    def flush(self) -> None:
        self._file.flush()

    def finish(self) -> str:
        """Flush, fsync and close; returns the hex sha256."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON-serializable")


def encode_metadata(metadata: dict) -> bytes:
    return json.dumps(metadata, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False, default=_json_default).encode("utf-8")


def encode_image(pixels: np.ndarray, image_format: str = "png") -> bytes:
    """uint16 (H, W) -> 16-bit grayscale PNG bytes, or .npy bytes."""
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 2 or pixels.dtype.kind != "u" or pixels.itemsize != 2:
        raise ValueError(f"pixels must be a 2-D uint16 array, got "
                         f"{getattr(pixels, 'dtype', type(pixels))} {getattr(pixels, 'shape', '')}")
    if min(pixels.shape) < 1:
        raise ValueError("pixels must not be empty")
    pixels = np.ascontiguousarray(pixels, dtype="<u2")
    buffer = io.BytesIO()
    if image_format == "png":
        rows, cols = pixels.shape
        image = Image.frombuffer("I;16", (cols, rows), pixels, "raw", "I;16", 0, 1)
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif image_format == "npy":
        np.save(buffer, pixels, allow_pickle=False)
    else:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return buffer.getvalue()


def decode_image(key_or_ext: str, data: bytes) -> np.ndarray:
    """Bytes of a ``.png`` (16-bit grayscale) or ``.npy`` member -> uint16 (H, W), values exact.

    ``key_or_ext`` is an extension ("png", ".npy") or a member name ("abc.png"); the text after the
    last dot decides.
    """
    ext = key_or_ext.rsplit(".", 1)[-1].lower()
    if ext == "png":
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode not in ("I;16", "I;16B", "I;16L", "I"):
                raise ValueError(f"not a 16-bit grayscale PNG (Pillow mode {image.mode!r})")
            array = np.asarray(image)
        if array.dtype != np.uint16:  # mode "I" (older Pillow): int32 holding 0..65535
            if array.min(initial=0) < 0 or array.max(initial=0) > 65535:
                raise ValueError("PNG values outside the uint16 range")
            array = array.astype(np.uint16)
        return np.ascontiguousarray(array, dtype=np.uint16)
    if ext == "npy":
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.ndim != 2 or array.dtype.kind != "u" or array.itemsize != 2:
            raise ValueError(f"expected a 2-D uint16 array, got {array.dtype} {array.shape}")
        return np.ascontiguousarray(array, dtype=np.uint16)
    raise ValueError(f"no image decoder for extension {ext!r} (expected png or npy)")


def image_handler(key: str, data: bytes):
    """A ``webdataset`` decoder handler: decodes ``.png``/``.npy`` members to uint16, else passes."""
    ext = key.rsplit(".", 1)[-1].lower()
    if ext in IMAGE_FORMATS:
        return decode_image(ext, data)
    return None


class ShardSink:
    """Write samples into ``{prefix}-{n:04d}.tar`` shards under ``directory``; see the module doc."""

    def __init__(self, directory: Path, prefix: str, target_bytes: int = 1_000_000_000,
                 image_format: str = "png", *, max_samples: int = DEFAULT_MAX_SAMPLES):
        if not KEY_PATTERN.match(prefix or ""):
            raise ValueError("prefix must match ^[A-Za-z0-9_-]+$")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
        if target_bytes < 1 or max_samples < 1:
            raise ValueError("target_bytes and max_samples must be >= 1")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.image_format = image_format
        self.target_bytes = int(target_bytes)
        self.max_samples = int(max_samples)
        self.finished: list[ShardInfo] = []
        self._keys: set[str] = set()
        self._open_files: dict[str, _HashingFile] = {}
        self._closed = False
        import webdataset as wds  # here, not at the top: it imports torch (3 s) and the flow's process never writes

        self._writer = wds.ShardWriter(
            str(self.directory / f"{prefix}-%04d.tar"), maxcount=self.max_samples, maxsize=self.target_bytes,
            post=self._finish_shard, opener=self._open_shard, verbose=0,
            encoder=False, mtime=TAR_MTIME, user=TAR_USER, group=TAR_GROUP, mode=TAR_MODE)

    # ShardWriter hooks -------------------------------------------------------------------------
    def _open_shard(self, fname: str) -> _HashingFile:
        handle = _HashingFile(_temp_path(Path(fname)))
        self._open_files[fname] = handle
        return handle

    def _finish_shard(self, fname: str) -> None:
        handle = self._open_files.pop(fname)
        samples = self._writer.count   # still the closing shard's count when post runs
        if samples == 0:
            handle.discard()
            return
        final = Path(fname)
        try:
            digest = handle.finish()
            os.replace(handle.path, final)
        except BaseException:
            handle.discard()   # never leave a half-finished temporary behind a failed rename
            raise
        fsync_directory(final.parent)
        self.finished.append(ShardInfo(final.name, digest, samples, handle.bytes))

    # public API -----------------------------------------------------------------------------------
    def write(self, key: str, pixels: np.ndarray, metadata: dict) -> None:
        if self._closed:
            raise RuntimeError("ShardSink is closed")
        if not isinstance(key, str) or not KEY_PATTERN.match(key):
            raise ValueError(f"invalid sample key {key!r}: keys must match ^[A-Za-z0-9_-]+$ "
                             "(a dot would split the sample in WebDataset)")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if not isinstance(metadata, dict):
            raise TypeError("metadata must be a dict")
        sample = {"__key__": key, self.image_format: encode_image(pixels, self.image_format),
                  "json": encode_metadata(metadata)}
        self._writer.write(sample)
        self._keys.add(key)

    def close(self) -> list[ShardInfo]:
        """Finish the last shard; returns every finished shard in order. Idempotent."""
        if not self._closed:
            self._closed = True
            self._writer.close()
        return list(self.finished)

    def abort(self) -> None:
        """Discard the shard in progress (delete its temporary file); finished shards stay."""
        if self._closed:
            return
        self._closed = True
        tar = self._writer.tarstream
        self._writer.tarstream = None  # ShardWriter must never finish (rename) the discarded stream
        if tar is not None:
            try:  # close the tar stream while its file is open (else tarfile's __del__ writes later)
                tar.close()
            except Exception:
                pass
        for handle in self._open_files.values():
            handle.discard()
        self._open_files.clear()

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def remove_stale_temporaries(directory: Path) -> int:
    """Delete ``.*.tar.tmp`` files left by crashed sinks in ``directory``; returns how many.

    Only call it when no sink is writing into ``directory``.
    """
    removed = 0
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    for path in directory.iterdir():
        if _TEMP_PATTERN.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def iter_shard(path: Path) -> Iterator[tuple[str, np.ndarray, dict]]:
    """(key, uint16 image, metadata) for every sample of one shard, in file order.

    Uses ``webdataset.WebDataset`` on exactly this file: no brace expansion (the URL is passed in a
    list), no shuffling, and no node or worker splitting (the caller asked for this shard).
    """
    url = str(Path(path).resolve())
    import webdataset as wds

    dataset = wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None,
                             empty_check=False).decode(image_handler)
    for sample in dataset:
        images = [ext for ext in IMAGE_FORMATS if ext in sample]
        if len(images) != 1 or "json" not in sample:
            fields = sorted(k for k in sample if not k.startswith("__"))
            raise ValueError(f"sample {sample.get('__key__')!r} in {Path(path).name} has fields {fields}; "
                             "expected one of png/npy and json")
        yield sample["__key__"], sample[images[0]], sample["json"]
