"""Closed forms for the 2-layer GELU MLP projector of the LLaVA family.

M(x) = W2 GELU(W1 x + b1) + b2 is token-wise with Jacobian J = W2 diag(g) W1, where
g = GELU'(W1 x + b1). Its squared Frobenius norm is a quadratic form in g,

    ||J||_F^2 = sum_{h,k} g_h g_k (W2^T W2)_{hk} (W1 W1^T)_{hk} = g^T K g,

with K = (W2^T W2) o (W1 W1^T) (elementwise), H x H, fixed per model. For unit directions u
in d_v dimensions E ||J u||^2 = ||J||_F^2 / d_v, so ||J||_F / sqrt(d_v) is what the
zeroth-order estimator's E ||J u|| approximates, without sampling noise or a step size.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

GeluKind = Literal["erf", "tanh"]


@dataclass(frozen=True)
class MLPWeights:
    """The parameters of a Linear -> GELU -> Linear projector (views, not copies)."""

    w1: Tensor  # [H, d_v]
    b1: Tensor | None  # [H]
    w2: Tensor  # [d_l, H]
    b2: Tensor | None  # [d_l]
    gelu: GeluKind


def _gelu_kind(act: nn.Module) -> GeluKind | None:
    """Which GELU an activation module computes, read off its values (None if neither)."""
    probe = torch.linspace(-6, 6, 241, dtype=torch.float32, device="cpu")
    try:
        with torch.no_grad():
            values = act(probe).float()
    except Exception:  # noqa: BLE001 (anything that is not an elementwise GELU)
        return None
    for kind in ("erf", "tanh"):
        reference = nn.functional.gelu(probe, approximate="none" if kind == "erf" else "tanh")
        if torch.allclose(values, reference, atol=1e-6, rtol=0):
            return kind
    return None


def as_mlp(projector: nn.Module) -> MLPWeights | None:
    """The projector's MLP weights if it is exactly Linear -> GELU -> Linear, else None.

    Recognises the HF LLaVA projector (``linear_1``, ``act``, ``linear_2``) and an
    ``nn.Sequential`` of those three modules.
    """
    if all(hasattr(projector, name) for name in ("linear_1", "act", "linear_2")):
        parts = [projector.linear_1, projector.act, projector.linear_2]
        # Anything more (a norm, dropout in training) would change the Jacobian.
        extra = {name for name, _ in projector.named_children()} - {"linear_1", "act", "linear_2"}
        if extra:
            return None
    elif isinstance(projector, nn.Sequential) and len(projector) == 3:
        parts = list(projector)
    else:
        return None
    first, act, second = parts
    if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear)):
        return None
    kind = _gelu_kind(act)
    if kind is None:
        return None
    return MLPWeights(first.weight, first.bias, second.weight, second.bias, kind)


def gelu_derivative(a: Tensor, kind: GeluKind) -> Tensor:
    """GELU'(a), elementwise, for the exact (erf) or tanh-approximated GELU."""
    if kind == "erf":
        cdf = 0.5 * (1.0 + torch.erf(a / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
        return cdf + a * pdf
    c = math.sqrt(2.0 / math.pi)
    t = torch.tanh(c * (a + 0.044715 * a**3))
    return 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * a * a)


def _tensor_state(t: Tensor) -> tuple:
    """What changes when a weight does: storage, in-place version, dtype, device, values.

    The values are summarised by a strided sample, which also catches edits through
    ``.data`` (its own version counter) and weights made under inference mode (none).
    """
    try:
        version = t._version
    except RuntimeError:  # inference tensors track no version
        version = None
    flat = t.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // 4096)]
    return (t.data_ptr(), version, t.dtype, t.device, float(sample.double().sum()))


class _PerWeightsCache:
    """Values derived from a projector's weights, rebuilt whenever a weight changes.

    Keyed weakly by module. An entry holds weak references to the very weight tensors it
    was built from (so a replaced Parameter never matches, even if Python reuses an id)
    and their :func:`_tensor_state`.
    """

    def __init__(self, build: Callable[[MLPWeights, torch.device], object]) -> None:
        self.build = build
        self._entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.builds = 0

    def get(self, projector: nn.Module, mlp: MLPWeights, device: torch.device) -> object:
        tensors = [t for t in (mlp.w1, mlp.b1, mlp.w2, mlp.b2) if t is not None]
        state = (tuple(_tensor_state(t) for t in tensors), mlp.gelu, device)
        entry = self._entries.get(projector)
        fresh = (
            entry is not None
            and len(entry[0]) == len(tensors)
            and all(ref() is t for ref, t in zip(entry[0], tensors, strict=True))
            and entry[1] == state
        )
        if not fresh:
            with torch.no_grad():
                value = self.build(mlp, device)
            entry = (tuple(weakref.ref(t) for t in tensors), state, value)
            self._entries[projector] = entry
            self.builds += 1
        return entry[2]


def _gram_kernel(mlp: MLPWeights, device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
    """K = (W2^T W2) o (W1 W1^T), and float32 W1, b1 for the per-image part."""
    w1 = mlp.w1.to(device, torch.float32)
    w2 = mlp.w2.to(device, torch.float32)
    b1 = None if mlp.b1 is None else mlp.b1.to(device, torch.float32)
    return (w2.T @ w2) * (w1 @ w1.T), w1, b1


GRAM_KERNELS = _PerWeightsCache(_gram_kernel)


def exact_sensitivity(projector: nn.Module, mlp: MLPWeights, features: Tensor) -> Tensor:
    """||J_i||_F / sqrt(d_v) for every token: the closed form of E ||J_i u||.

    Args:
        projector: the module ``mlp`` was read from (the cache key for K).
        mlp: its weights, from :func:`as_mlp`.
        features: projector inputs, ``[B, N, d_v]``.

    Returns:
        ``[B, N]`` float32.
    """
    kernel, w1, b1 = GRAM_KERNELS.get(projector, mlp, features.device)
    x = features.to(torch.float32)
    a = x @ w1.T
    if b1 is not None:
        a = a + b1
    g = gelu_derivative(a, mlp.gelu)  # [B, N, H]
    squared = ((g @ kernel) * g).sum(dim=-1)
    return (squared.clamp_min(0.0) / x.shape[-1]).sqrt()


def low_rank_factors(mlp: MLPWeights, device: torch.device, rank: int) -> list[Tensor]:
    """``[A1, C1, A2, C2]`` with ``x @ A @ C`` the rank-``rank`` SVD truncation of ``x @ W^T``."""
    factors = []
    for w in (mlp.w1, mlp.w2):
        u, s, vh = torch.linalg.svd(w.to(device, torch.float32), full_matrices=False)
        r = min(rank, s.numel())
        factors += [vh[:r].T * s[:r], u[:, :r].T]  # x @ (V S) @ U^T == x @ W_r^T
    return factors


_LOW_RANK: dict[int, _PerWeightsCache] = {}


def low_rank_projector(
    projector: nn.Module, mlp: MLPWeights, rank: int, device: torch.device
) -> Callable[[Tensor], Tensor]:
    """The projector with each Linear replaced by its rank-``rank`` SVD truncation.

    The authors score LLaVA-NeXT this way: each pass costs about
    ``rank * (d_v + 2H + d_l)`` multiply-adds per token instead of ``H * (d_v + d_l)``.
    The factors are computed once per weights and cached. Evaluates in float32.
    """
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    if rank not in _LOW_RANK:
        _LOW_RANK[rank] = _PerWeightsCache(lambda m, d, r=rank: low_rank_factors(m, d, r))
    a1, c1, a2, c2 = _LOW_RANK[rank].get(projector, mlp, device)
    b1 = None if mlp.b1 is None else mlp.b1.to(device, torch.float32)
    b2 = None if mlp.b2 is None else mlp.b2.to(device, torch.float32)
    approximate = "none" if mlp.gelu == "erf" else "tanh"

    def project(x: Tensor) -> Tensor:
        h = (x @ a1) @ c1
        h = nn.functional.gelu(h if b1 is None else h + b1, approximate=approximate)
        out = (h @ a2) @ c2
        return out if b2 is None else out + b2

    return project
