"""Closed forms for the 2-layer GELU MLP projector of the LLaVA family.

M(x) = W2 GELU(W1 x + b1) + b2 is token-wise with Jacobian J = W2 diag(g) W1, where
g = GELU'(W1 x + b1). Its squared Frobenius norm is a quadratic form in g,

    ||J||_F^2 = sum_{h,k} g_h g_k (W2^T W2)_{hk} (W1 W1^T)_{hk} = g^T K g,

with K = (W2^T W2) o (W1 W1^T) (elementwise), H x H, fixed per model. For unit directions u
in d_v dimensions E ||J u||^2 = ||J||_F^2 / d_v, so ||J||_F / sqrt(d_v) is what the
zeroth-order estimator's E ||J u|| approximates, without sampling noise or a step size.

K is positive definite for any projector whose W2 has full column rank (the Schur product
of a positive definite and a positive semi-definite matrix with a positive diagonal), so
it factors once per model as K = L L^T, L lower triangular, and g^T K g = ||g^T L||^2: a sum
of squares, and half the multiply-adds of g^T K g, because the product skips L's zero upper
triangle block by block. A K that does not factor is used as it is.
"""

from __future__ import annotations

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
    """GELU'(a), elementwise, for the exact (erf) or tanh-approximated GELU: the kernel
    autograd runs for GELU's backward (one fused pass, where the textbook formula takes
    ten)."""
    approximate = "none" if kind == "erf" else "tanh"
    return torch.ops.aten.gelu_backward(torch.ones_like(a), a, approximate=approximate)


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


#: tokens per pass of the exact form: a pass's [tokens, H] intermediates stay in cache
EXACT_CHUNK = 1024
#: columns of L per product of the factored form: finer blocks skip more of L's zero upper
#: triangle ((H / block + 1) / (2 H / block) of the dense work) but make smaller products
FACTOR_BLOCK = 128


@dataclass(frozen=True)
class GramKernel:
    """What the exact form needs of a projector's weights, in float32: K's lower triangular
    factor L (None where K does not factor: then K itself), W1 and b1."""

    kernel: Tensor | None  # [H, H], only where it did not factor
    factor: Tensor | None  # [H, H] lower triangular, K = L L^T
    w1: Tensor  # [H, d_v]
    b1: Tensor | None  # [H]

    def quadratic_form(self, g: Tensor) -> Tensor:
        """g^T K g for every row of ``g`` ``[T, H]``: ``[T]``."""
        if self.factor is None:
            return ((g @ self.kernel) * g).sum(dim=-1)
        squared = g.new_zeros(g.shape[0])
        hidden = g.shape[1]
        for start in range(0, hidden, FACTOR_BLOCK):
            stop = min(start + FACTOR_BLOCK, hidden)
            # Columns start:stop of g^T L: L's rows above start are zero there.
            squared += (g[:, start:] @ self.factor[start:, start:stop]).square_().sum(dim=-1)
        return squared


def _gram_kernel(mlp: MLPWeights, device: torch.device) -> GramKernel:
    """K = (W2^T W2) o (W1 W1^T), factored (in float64) where it is positive definite."""
    w1 = mlp.w1.to(device, torch.float32)
    w2 = mlp.w2.to(device, torch.float32)
    b1 = None if mlp.b1 is None else mlp.b1.to(device, torch.float32)
    kernel = (w2.T @ w2) * (w1 @ w1.T)
    factor, info = torch.linalg.cholesky_ex(kernel.double())
    if int(info) == 0:
        return GramKernel(None, factor.float(), w1, b1)
    return GramKernel(kernel, None, w1, b1)


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
    gram = GRAM_KERNELS.get(projector, mlp, features.device)
    x = features.to(torch.float32)
    squared = x.new_empty(x.shape[:-1])
    # Image by image, so that an image's scores are the same numbers whatever else is in
    # the batch (a product's rounding may depend on its shape).
    for image, tokens in enumerate(x):
        for start in range(0, tokens.shape[0], EXACT_CHUNK):
            a = tokens[start : start + EXACT_CHUNK] @ gram.w1.T
            if gram.b1 is not None:
                a += gram.b1
            g = gelu_derivative(a, mlp.gelu)
            squared[image, start : start + EXACT_CHUNK] = gram.quadratic_form(g)
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
