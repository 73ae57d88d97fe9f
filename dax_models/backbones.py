"""Backbones for gray X-ray images: one door, ``create_backbone``, with a small registry behind it.

Every backbone is a timm model made by ``timm.create_model(..., pretrained=False, num_classes=0)``
(no download ever: random init unless a local checkpoint file is given) and wrapped in ``Backbone``,
which gives DINO and the heads the three views of the features they need:

- ``forward(x)``: pooled features (B, D): the ViT CLS token after the final norm, the ResNet global
  average pool. This is what DINO's projection head, the kNN monitor and the linear heads use.
- ``last4(x)``: the linear probe's features, four levels concatenated: the CLS tokens of the last 4 ViT
  blocks, normed (B, 4D; DINO's linear probe), or the global average pools of the 4 ResNet stages (B, sum
  C_i; stages 1-3 carry the finer detail that the final pool alone loses: docs/experiments.md, section 16).
- ``feature_maps(x)``: multi-level maps (B, C_i, H_i, W_i): ResNet stages 1-4 (strides 4-32), or the
  patch tokens of 4 ViT blocks spread over the depth (``vit_map_blocks``: blocks 3, 6, 9 and 12 of 12,
  0-based [2, 5, 8, 11], as DPT reads a ViT), normed and reshaped to (B, D, H/16, W/16). For the dense
  heads: the last 4 blocks alone carry too little local detail for thin metal and screws.

Gray input: ``in_chans=1`` builds the stem for one channel; ``in_chans=3`` keeps a 3-channel stem and
the gray channel is copied to 3 channels (DAX's habit, and what an ImageNet checkpoint expects).
Inputs of any size work: ViTs are made with ``dynamic_img_size=True`` (position embeddings
interpolated), ResNets are fully convolutional.

``load_checkpoint`` accepts DINO's checkpoints (``teacher``/``student`` entries, ``module.`` and
``backbone.`` prefixes, a ``head.`` that is dropped), plain state dicts and timm files; a 3-channel
stem is folded to one channel with timm's ``adapt_input_conv`` and position embeddings are resampled.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from torch import nn

__all__ = ["ARCHITECTURES", "FEATURE_PARTS", "LEGACY_PARTS", "Backbone", "BackboneSpec", "autocast", "create_backbone",
           "extract", "load_checkpoint", "resolve_device", "vit_map_blocks"]


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    kind: str            # "vit" or "resnet"


ARCHITECTURES: dict[str, BackboneSpec] = {
    "vit_tiny_patch16": BackboneSpec("vit_tiny_patch16_224", "vit"),
    "vit_small_patch16": BackboneSpec("vit_small_patch16_224", "vit"),
    "vit_base_patch16": BackboneSpec("vit_base_patch16_224", "vit"),
    "resnet18": BackboneSpec("resnet18", "resnet"),
    "resnet50": BackboneSpec("resnet50", "resnet"),
}


def vit_map_blocks(depth: int, levels: int = 4) -> list[int]:
    """0-based indices of ``levels`` ViT blocks evenly spread over ``depth``, the last one included (DPT)."""
    return [depth * (i + 1) // levels - 1 for i in range(levels)]


class Backbone(nn.Module):
    """A timm feature extractor for gray images; see the module docstring for its three outputs."""

    def __init__(self, arch: str, model: nn.Module, in_chans: int):
        super().__init__()
        self.arch = arch
        self.kind = ARCHITECTURES[arch].kind
        self.in_chans = in_chans
        self.model = model
        # ResNets keep weights and activations channels-last on every device (oneDNN on CPU, cuDNN on CUDA): the
        # ResNet-18 DINO step runs 1.21x as fast on 2 CPU cores (BENCHMARKS.md, "Pretraining", last column)
        self.use_channels_last(self.kind == "resnet")
        self.embed_dim = int(model.num_features)
        self.patch_size = int(model.patch_embed.patch_size[0]) if self.kind == "vit" else None

    @property
    def map_blocks(self) -> list[int] | None:
        """The ViT blocks ``feature_maps`` reads (None for ResNets)."""
        return vit_map_blocks(len(self.model.blocks)) if self.kind == "vit" else None

    @property
    def feature_channels(self) -> list[int]:
        """Channels of ``feature_maps``' levels, finest first."""
        if self.kind == "vit":
            return [self.embed_dim] * 4
        return [info["num_chs"] for info in self.model.feature_info[1:]]

    def use_channels_last(self, on: bool) -> "Backbone":
        """Weights and inputs channels-last (``on``) or contiguous; the same outputs either way."""
        self.channels_last = on
        self.model.to(memory_format=torch.channels_last if on else torch.contiguous_format)
        return self

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self._input(x))

    def last4(self, x: torch.Tensor) -> torch.Tensor:
        """The linear probe's features (module docstring): ViT last-4 CLS, ResNet the 4 stages' average pools."""
        if self.kind != "vit":
            return stage_pools(self.feature_maps(x))
        blocks = self.model.forward_intermediates(self._input(x), indices=4, return_prefix_tokens=True,
                                                  norm=True, intermediates_only=True)
        return torch.cat([prefix[:, 0] for _, prefix in blocks], dim=1)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self._input(x)
        if self.kind == "vit":
            return list(self.model.forward_intermediates(x, indices=self.map_blocks, norm=True,
                                                         intermediates_only=True))
        return list(self.model.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True))

    @torch.no_grad()
    def last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of the last ViT block, (B, heads, tokens, tokens), softmaxed (DINO's figure)."""
        if self.kind != "vit":
            raise ValueError(f"{self.arch} has no self-attention")
        attn = self.model.blocks[-1].attn
        seen: dict[str, torch.Tensor] = {}
        handle = attn.register_forward_pre_hook(lambda _module, args: seen.__setitem__("x", args[0]))
        try:
            self.model.forward_features(self._input(x))
        finally:
            handle.remove()
        tokens = seen["x"]
        b, n, c = tokens.shape
        qkv = attn.qkv(tokens).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _state_dict_from(obj, prefer: str = "teacher") -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in (prefer, "teacher", "student", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return _state_dict_from(obj[key], prefer)
    return obj


def load_checkpoint(backbone: Backbone, path: Path | str, prefer: str = "teacher") -> dict[str, list[str]]:
    """Load backbone weights from a local file (DINO, timm or plain state dict); returns what was skipped."""
    raw = torch.load(Path(path), map_location="cpu", weights_only=True)
    state = _state_dict_from(raw, prefer)
    cleaned: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        for prefix in ("module.", "backbone.", "model."):
            name = name.removeprefix(prefix)
        if name.startswith(("head.", "fc.")) or not torch.is_tensor(value):
            continue
        cleaned[name] = value
    target = backbone.model.state_dict()
    stem = "patch_embed.proj.weight" if backbone.kind == "vit" else "conv1.weight"
    if stem in cleaned and cleaned[stem].shape[1] != backbone.in_chans:
        cleaned[stem] = timm.models.adapt_input_conv(backbone.in_chans, cleaned[stem])
    if backbone.kind == "vit" and "pos_embed" in cleaned and cleaned["pos_embed"].shape != target["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed
        grid = backbone.model.patch_embed.grid_size
        cleaned["pos_embed"] = resample_abs_pos_embed(cleaned["pos_embed"], list(grid), num_prefix_tokens=1)
    usable = {k: v for k, v in cleaned.items() if k in target and target[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{Path(path).name}: no tensor matches a {backbone.arch} backbone")
    backbone.model.load_state_dict(usable, strict=False)
    return {"missing": sorted(set(target) - set(usable)), "unexpected": sorted(set(cleaned) - set(usable))}


def create_backbone(arch: str, in_chans: int = 1, img_size: int = 224, drop_path_rate: float = 0.0,
                    checkpoint: Path | str | None = None) -> Backbone:
    """The one door to a backbone: ``arch`` from ``ARCHITECTURES``, random init or a local checkpoint."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, not {in_chans}")
    spec = ARCHITECTURES[arch]
    kwargs: dict = {"pretrained": False, "num_classes": 0, "in_chans": in_chans}
    if spec.kind == "vit":
        kwargs.update(img_size=img_size, dynamic_img_size=True, drop_path_rate=drop_path_rate)
    else:
        kwargs.update(drop_path_rate=drop_path_rate)
    backbone = Backbone(arch, timm.create_model(spec.timm_name, **kwargs), in_chans)
    if checkpoint is not None:
        load_checkpoint(backbone, checkpoint)
    return backbone


# ------------------------------------------------------------------ features of a frozen backbone

FEATURE_PARTS = ("pooled", "last4", "maps")
LEGACY_PARTS = {"cls4": "last4"}   # heads registered before the rename read their part under its old name


def stage_pools(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """A ResNet's ``last4``: each stage's map average-pooled over space, concatenated (B, sum C_i)."""
    return torch.cat([m.mean((2, 3)) for m in maps], dim=1)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


@torch.no_grad()
def extract(backbone: Backbone, x: torch.Tensor, parts: Sequence[str] = FEATURE_PARTS) -> dict[str, Any]:
    """The requested feature parts of a batch, from ONE backbone pass.

    ``pooled`` (B, D): ``backbone(x)``; ``last4``: the linear probe's features, ``backbone.last4(x)`` (ViT:
    the CLS tokens of the last 4 blocks, normed and concatenated; ResNet: the 4 stages' average pools);
    ``maps``: the 4 levels of ``backbone.feature_maps(x)``. A legacy name (``LEGACY_PARTS``) is answered under
    the name asked for.
    """
    asked = set(parts)
    parts = {LEGACY_PARTS.get(p, p) for p in asked}
    model = backbone.model
    x = backbone._input(x)
    out: dict[str, Any] = {}
    if backbone.kind == "vit":
        if parts & {"last4", "maps"}:
            last4 = list(range(len(model.blocks) - 4, len(model.blocks)))
            wanted = sorted(set(last4 if "last4" in parts else []) | set(backbone.map_blocks if "maps" in parts
                                                                          else []))
            final, inter = model.forward_intermediates(x, indices=wanted, return_prefix_tokens=True, norm=True)
            block = dict(zip(wanted, inter))
            if "pooled" in parts:
                out["pooled"] = model.forward_head(final)
            if "last4" in parts:
                out["last4"] = torch.cat([block[i][1][:, 0] for i in last4], dim=1)
            if "maps" in parts:
                out["maps"] = [block[i][0] for i in backbone.map_blocks]
        else:
            out["pooled"] = model(x)
    elif parts & {"last4", "maps"}:
        final, inter = model.forward_intermediates(x, indices=[1, 2, 3, 4])
        if "pooled" in parts:
            out["pooled"] = model.forward_head(final)
        if "last4" in parts:
            out["last4"] = stage_pools(inter)
        if "maps" in parts:
            out["maps"] = list(inter)
    else:
        out["pooled"] = model(x)
    for legacy in asked & LEGACY_PARTS.keys():
        out[legacy] = out[LEGACY_PARTS[legacy]]
    return out


def autocast(device: torch.device):
    """bf16 autocast on CUDA, a no-op elsewhere (the frozen-feature and end-to-end passes)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

