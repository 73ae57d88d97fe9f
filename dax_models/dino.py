"""DINO's parts, as facebookresearch/dino ``main_dino.py`` and ``utils.py`` define them, in plain torch.

- ``DINOHead``: 3-layer GELU MLP (hidden 2048, bottleneck 256), L2 normalization, weight-normed last
  layer to ``out_dim`` with its norm (``weight_g``) fixed to 1 when ``norm_last_layer``; ``use_bn`` adds
  BatchNorm after the hidden layers (DAX's ResNet-50 recipe).
- ``MultiCropWrapper``: runs the backbone once per crop resolution, the head once over all crops.
- ``DINOLoss``: cross-entropy between the centred, sharpened teacher distribution of each global crop
  and the student distribution of every other crop; the centre is an EMA (0.9) of the teacher's batch
  mean, all-reduced across ranks. It also returns the numbers that reveal collapse: teacher entropy
  (per crop and of the batch mean; their difference is the teacher's information about the crop) and
  the student-teacher KL (loss = teacher entropy + KL for every pair).
- Schedules: ``cosine_schedule`` (per step, with linear warm-up) for lr, weight decay and EMA momentum;
  ``teacher_temperature_schedule`` (per epoch, linear warm-up).
- ``ema_update`` (teacher <- m * teacher + (1 - m) * student), ``clip_gradients`` (per parameter, not
  global norm), ``cancel_last_layer_gradients`` (frozen last layer in the first epochs),
  ``param_groups`` (no weight decay on biases and norms), ``LARS`` (DINO's, used by DAX for ResNets).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = [
    "DINOHead", "DINOLoss", "LARS", "MultiCropWrapper", "cancel_last_layer_gradients", "clip_gradients",
    "cosine_schedule", "ema_update", "entropy_ceiling", "lars_reach", "momentum_for_half_life", "param_groups",
    "teacher_temperature_schedule", "teacher_weights",
]


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        if norm_last_layer:
            magnitude.requires_grad = False

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops; crops of one resolution share one backbone call."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if not isinstance(crops, (list, tuple)):
            crops = [crops]
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
        features, start = [], 0
        for end in ends:
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(features))


def _all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
        tensor = tensor / dist.get_world_size()
    return tensor


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, global_crops: int = 2, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.global_crops = global_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float,
                crops: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss over all (teacher global crop, other student crop) pairs, plus collapse statistics."""
        student_out = (student_output.float() / self.student_temp).chunk(crops)
        teacher_logits = (teacher_output.float() - self.center) / teacher_temp
        teacher_probs = F.softmax(teacher_logits, dim=-1).detach()
        teacher_out = teacher_probs.chunk(self.global_crops)
        total, terms = 0.0, 0
        for iq, q in enumerate(teacher_out):
            for v, s in enumerate(student_out):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        loss = total / terms
        with torch.no_grad():
            log_q = F.log_softmax(teacher_logits, dim=-1)
            entropy = -(teacher_probs * log_q).sum(-1).mean()
            mean_probs = teacher_probs.mean(0)
            batch_entropy = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
            stats = {
                "teacher_entropy": float(entropy),
                "kl": float(loss.detach() - entropy),            # CE = H(teacher) + KL(teacher || student)
                "teacher_batch_entropy": float(batch_entropy),   # log(out_dim) when usage is spread evenly
                # what the teacher's output tells about which crop it saw (the mutual information between
                # crop and prototype over the batch, nats): exp() of it is how many equally likely groups
                # the teacher sorts the batch into; it falls to 0 in both collapse modes, partial ones too
                "teacher_information": float(batch_entropy - entropy),
                "center_norm": float(self.center.norm()),
            }
        self.update_center(teacher_output)
        return loss, stats

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = _all_reduce_mean(teacher_output.float().mean(dim=0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
                    start_warmup: float = 0.0) -> np.ndarray:
    """One value per step: linear warm-up from ``start_warmup`` to ``base``, then cosine to ``final``."""
    warmup_steps = warmup_epochs * steps_per_epoch
    warmup = np.linspace(start_warmup, base, warmup_steps) if warmup_steps > 0 else np.array([])
    iters = np.arange(epochs * steps_per_epoch - warmup_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * steps_per_epoch
    return schedule


def teacher_temperature_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """One value per epoch: linear from ``warmup_temp`` to ``temp`` over ``warmup_epochs``, then flat."""
    warmup_epochs = min(warmup_epochs, epochs)
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.full(epochs - warmup_epochs, temp)))


def momentum_for_half_life(half_life_steps: float) -> float:
    """The EMA momentum under which a student step's weight in the teacher halves every ``half_life_steps``."""
    if half_life_steps <= 0:
        raise ValueError("a teacher half-life must be > 0 steps")
    return 0.5 ** (1.0 / half_life_steps)


def teacher_weights(momentum: np.ndarray) -> tuple[float, np.ndarray]:
    """What the final teacher is made of, given the per-step EMA momentum: (the weight left on the
    initialisation, the weight of the student after each step). They sum to 1."""
    m = np.asarray(momentum, dtype=np.float64)
    after = np.concatenate((np.cumprod(m[::-1])[::-1][1:], [1.0]))   # prod of the momenta after step t
    return float(np.prod(m)), (1.0 - m) * after


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)


def clip_gradients(model: nn.Module, clip: float) -> None:
    """DINO's clipping: each parameter's gradient norm is clipped to ``clip`` on its own (no host sync)."""
    for p in model.parameters():
        if p.grad is not None:
            coef = clip / (p.grad.detach().norm(2) + 1e-6)
            p.grad.mul_(coef.clamp(max=1.0))


def cancel_last_layer_gradients(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weights only; biases and norm parameters (1-D) are not regularized."""
    regularized, not_regularized = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or p.ndim == 1 else regularized).append(p)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


LARS_ETA, LARS_MOMENTUM = 0.001, 0.9    # DINO's LARS defaults (trust coefficient, momentum)


class LARS(torch.optim.Optimizer):
    """LARS as in DINO's utils (SGD with momentum, layer-wise trust ratio; 1-D parameters skip both)."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = LARS_MOMENTUM,
                 eta: float = LARS_ETA):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim != 1:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, group["eta"] * param_norm / update_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])


def lars_reach(lrs, eta: float = LARS_ETA, momentum: float = LARS_MOMENTUM) -> float:
    """How far LARS can move a layer over a run, relative to the layer's norm: each step's update is scaled to
    ``eta`` times the weights' norm, momentum adds up to ``1 / (1 - momentum)`` of it, and ``lrs`` (the per-step
    schedule) multiply. The linear batch scaling of DINO's ResNet recipe (lr 0.3 at batch 256) over a few hundred
    steps of 32 reaches 0.08: ResNet-18 weights then moved by 0.8 % over the run (docs/experiments.md, section 13)."""
    return float(sum(lrs)) * eta / (1.0 - momentum)


def entropy_ceiling(out_dim: int) -> float:
    """Largest possible teacher entropy (uniform output): the reference for collapse thresholds."""
    return math.log(out_dim)
