"""The feature cache: one frozen-backbone pass per image, stored once and read by every head.

Parts (``dax_models.backbones.extract``), stored as float16:

- ``pooled`` (N, D): ``Backbone.forward`` (ViT CLS after the final norm, ResNet global average pool);
- ``last4``: the linear probe's features (``Backbone.last4``): the CLS tokens of the last 4 ViT blocks,
  normed and concatenated (N, 4D; DINO's linear probe), or the 4 ResNet stages' average pools (N, sum C_i);
- ``maps``: the multi-level maps of ``Backbone.feature_maps`` (4 levels (N, C_i, H_i, W_i); for ViTs
  blocks spread over the depth, ``backbones.vit_map_blocks``).

They are computed once per (backbone weights, data) and kept in memory or, with a cache folder
(the flow uses ``HOME/cache/features/``), as ``.npy`` memmaps written batch by batch and read by
slices, so memory stays bounded whatever the corpus size; the cache key is the sha256 of the
backbone's weights and of the dataset's identity, so every epoch, head, task and seed reuses them.
``LiveFeatures`` has the same ``get`` interface but runs the backbone on every call: the
benchmark's "recompute every epoch" baseline.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from dax_models.backbones import (
    FEATURE_PARTS,
    Backbone,
    autocast,
    extract,
    resolve_device,
)

__all__ = ["FeatureStore", "LiveFeatures", "backbone_digest", "compute_features"]


def backbone_digest(backbone: nn.Module) -> str:
    """sha256 of the backbone's architecture and weights: the identity its features are cached under."""
    h = hashlib.sha256(f"{getattr(backbone, 'arch', type(backbone).__name__)}:{getattr(backbone, 'in_chans', '')}"
                       .encode())
    for name, tensor in backbone.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class FeatureStore:
    """Cached frozen features of one backbone on one dataset (module docstring); ``get`` gives float32."""

    def __init__(self, arrays: dict[str, np.ndarray], maps: list[np.ndarray], meta: dict, path: Path | None = None):
        self.arrays, self.maps, self.meta, self.path = arrays, maps, meta, path

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.meta["parts"])

    def __len__(self) -> int:
        return int(self.meta["n"])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values()) + sum(m.nbytes for m in self.maps)

    @property
    def map_channels(self) -> list[int]:
        return [int(m.shape[1]) for m in self.maps]

    def get(self, part: str, idx: np.ndarray | Sequence[int], device: torch.device | str = "cpu"):
        """Rows ``idx`` of a part as float32 tensors on ``device`` (a list of 4 tensors for ``maps``)."""
        idx = np.asarray(idx, dtype=np.int64)
        if part == "maps":
            return [torch.from_numpy(np.ascontiguousarray(m[idx])).to(device).float() for m in self.maps]
        return torch.from_numpy(np.ascontiguousarray(self.arrays[part][idx])).to(device).float()

    @classmethod
    def compute(cls, backbone: Backbone, images: torch.Tensor, parts: Sequence[str] = FEATURE_PARTS,
                device: torch.device | str = "cpu", batch_size: int = 64, cache_dir: Path | None = None,
                data_digest: str | None = None, log: Callable[[str], None] | None = None) -> "FeatureStore":
        """Run ``backbone`` once over ``images`` (N, 1, S, S); reuse a complete cache entry if there is one.

        With ``cache_dir``, the entry ``cache_dir/<key>/`` holds one ``.npy`` per part and level (written
        as memmaps batch by batch, then renamed into place, ``meta.json`` last) and is opened as memmaps.
        """
        device = torch.device(device)
        parts = tuple(p for p in FEATURE_PARTS if p in set(parts))
        n = len(images)
        if data_digest is None:
            data_digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()
        identity = f"{backbone_digest(backbone)}:{data_digest}:{','.join(parts)}:f16:v2"
        key = hashlib.sha256(identity.encode()).hexdigest()[:32]
        if cache_dir is not None:
            entry = Path(cache_dir) / key
            found = cls.open(entry)
            if found is not None:
                if log:
                    log(f"features: cache hit {key[:12]} ({found.nbytes / 2**20:.1f} MiB)")
                return found
        was_training = backbone.training
        backbone.eval().to(device)
        arrays: dict[str, np.ndarray] = {}
        maps: list[np.ndarray] = []
        tmp = None
        if cache_dir is not None:
            tmp = Path(cache_dir) / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
            tmp.mkdir(parents=True, exist_ok=True)
        try:
            for start in range(0, n, batch_size):
                x = images[start:start + batch_size].to(device, dtype=torch.float32)
                with autocast(device):
                    out = extract(backbone, x, parts)
                for part in ("pooled", "last4"):
                    if part in out:
                        value = out[part].detach().float().cpu().numpy().astype(np.float16)
                        if part not in arrays:
                            arrays[part] = _allocate(tmp, f"{part}.npy", (n, *value.shape[1:]))
                        arrays[part][start:start + len(value)] = value
                if "maps" in out:
                    for level, value in enumerate(out["maps"]):
                        value = value.detach().float().cpu().numpy().astype(np.float16)
                        if len(maps) <= level:
                            maps.append(_allocate(tmp, f"map{level}.npy", (n, *value.shape[1:])))
                        maps[level][start:start + len(value)] = value
        except BaseException:
            if tmp is not None:
                _remove_tree(tmp)
            raise
        finally:
            backbone.train(was_training)
        meta = {"n": n, "parts": list(parts), "key": key, "arch": getattr(backbone, "arch", None),
                "levels": len(maps), "pooled_dim": int(arrays["pooled"].shape[1]) if "pooled" in arrays else None}
        if tmp is None:
            return cls(arrays, maps, meta)
        for array in list(arrays.values()) + maps:
            array.flush()
        (tmp / "meta.json").write_text(json.dumps(meta))
        entry = Path(cache_dir) / key
        try:
            os.replace(tmp, entry)
        except OSError:           # another process finished the same entry first: use it
            _remove_tree(tmp)
        if log:
            log(f"features: computed {n} images -> cache {key[:12]}")
        return cls.open(entry)

    @classmethod
    def open(cls, entry: Path) -> "FeatureStore | None":
        """A complete cache entry as read-only memmaps, or None."""
        entry = Path(entry)
        meta_file = entry / "meta.json"
        if not meta_file.is_file():
            return None
        meta = json.loads(meta_file.read_text())
        arrays = {p: np.load(entry / f"{p}.npy", mmap_mode="r") for p in ("pooled", "last4")
                  if (entry / f"{p}.npy").is_file()}
        maps = [np.load(entry / f"map{i}.npy", mmap_mode="r") for i in range(meta.get("levels", 0))]
        return cls(arrays, maps, meta, entry)


def _allocate(folder: Path | None, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if folder is None:
        return np.zeros(shape, dtype=np.float16)
    return np.lib.format.open_memmap(folder / name, mode="w+", dtype=np.float16, shape=shape)


def _remove_tree(path: Path) -> None:
    for child in Path(path).glob("*"):
        child.unlink(missing_ok=True)
    Path(path).rmdir()


class LiveFeatures:
    """``FeatureStore``'s interface, but the backbone runs on every ``get`` (no cache)."""

    def __init__(self, backbone: Backbone, images: torch.Tensor, device: torch.device | str = "cpu"):
        self.backbone = backbone.eval().to(device)
        self.images, self.device = images, torch.device(device)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def map_channels(self) -> list[int]:
        return list(self.backbone.feature_channels)

    def get(self, part: str, idx, device: torch.device | str = "cpu"):
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        x = self.images[idx].to(self.device, dtype=torch.float32)
        with autocast(self.device):
            out = extract(self.backbone, x, (part,))[part]
        if part == "maps":
            return [m.float().to(device) for m in out]
        return out.float().to(device)


def compute_features(role: str, view: str, backbone: Backbone, images: torch.Tensor, cache_dir: str,
                     data_digest: str, parts: Sequence[str], device: str = "auto", batch_size: int = 64) -> str:
    """Features of one backbone (``role``) on one view's images (cached under ``cache_dir``); returns the cache
    entry's folder."""
    store = FeatureStore.compute(backbone, images, parts, resolve_device(device), batch_size, Path(cache_dir),
                                 data_digest)
    return str(store.path)

