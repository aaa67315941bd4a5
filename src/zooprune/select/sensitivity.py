"""Per-token sensitivity of the projector: how much its output moves when a token moves.

ZOO-Prune scores token i by S(i) = E_u ||J_i u||_2, the expected output change of the
projector M for a unit input direction u, estimated without gradients by central
differences over a bank of random directions. See ``shared/design/zoo-prune.md`` §1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from zooprune.select.ops import at_least_float32

Projector = Callable[[Tensor], Tensor]


def direction_bank(
    num_directions: int, dim: int, *, seed: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Unit-norm Gaussian directions, reproducible from ``seed`` on any device.

    Drawn on the CPU so that the same seed gives the same bank on every device.

    Returns:
        ``[num_directions, dim]`` float32, each row of L2 norm 1.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    bank = torch.randn(num_directions, dim, generator=generator, dtype=torch.float32, device="cpu")
    return (bank / bank.norm(dim=-1, keepdim=True)).to(device)


def zo_sensitivity(
    project: Projector,
    features: Tensor,
    *,
    num_directions: int = 64,
    step: float = 0.01,
    seed: int = 0,
    chunk_size: int = 8,
    compute_dtype: torch.dtype = torch.float32,
    mask: Tensor | None = None,
) -> Tensor:
    """Zeroth-order sensitivity of a token-wise projector, batched over images.

    S(i) = (1/m) sum_j || (M(x_i + h u_j) - M(x_i - h u_j)) / (2h) ||_2, with one bank of
    m unit directions shared by every token of every image (so an image's scores do not
    depend on what else is in the batch).

    Args:
        project: the projector M, applied row-wise: ``[..., d_v] -> [..., d_l]``. It is
            called on inputs of ``compute_dtype``; pass a projector whose parameters are in
            that dtype (see :func:`projector_in_dtype`).
        features: projector inputs X, ``[B, N, d_v]``.
        num_directions: m.
        step: h.
        seed: seeds the direction bank.
        chunk_size: directions evaluated per projector call (bounds peak memory to about
            ``2 * chunk_size * B * N * d_l`` elements).
        compute_dtype: dtype of the perturbed inputs and of the projector evaluation.
            float32 (default) keeps the differences numerically sound; float16 rounds the
            perturbed inputs as the authors' code does, for comparison only.
        mask: optional ``[B, N]`` bool, True for real tokens. Padded tokens score 0.

    Returns:
        ``[B, N]`` sensitivities, float32 (float64 for float64 features).
    """
    if features.ndim != 3:
        raise ValueError(f"features must be [B, N, d_v], got shape {tuple(features.shape)}")
    if not step > 0:
        raise ValueError(f"step must be positive, got {step}")

    def central_difference(x: Tensor, u: Tensor) -> Tensor:
        plus = (x + step * u).to(compute_dtype)
        minus = (x - step * u).to(compute_dtype)
        # One projector call for both signs of the whole chunk.
        out = project(torch.cat([plus, minus])).to(x.dtype)  # [2c, B, N, d_l]
        return (out[: u.shape[0]] - out[u.shape[0] :]) / (2 * step)

    return _mean_norm_over_bank(
        central_difference, features, num_directions, seed, chunk_size, mask
    )


def _mean_norm_over_bank(
    directional: Callable[[Tensor, Tensor], Tensor],
    features: Tensor,
    num_directions: int,
    seed: int,
    chunk_size: int,
    mask: Tensor | None,
) -> Tensor:
    """(1/m) sum_j ||directional(x, u_j)|| over the seeded bank, in chunks of directions.

    ``directional(x [B, N, d_v], u [c, 1, 1, d_v])`` returns ``[c, B, N, d_l]``.
    """
    if num_directions < 1 or chunk_size < 1:
        raise ValueError("num_directions and chunk_size must be positive")
    x = at_least_float32(features)
    bank = direction_bank(num_directions, x.shape[-1], seed=seed, device=x.device).to(x.dtype)
    total = torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
    for start in range(0, num_directions, chunk_size):
        u = bank[start : start + chunk_size, None, None, :]  # [c, 1, 1, d_v]
        total += directional(x, u).to(x.dtype).norm(dim=-1).sum(dim=0)
    sensitivity = total / num_directions
    if mask is not None:
        sensitivity = sensitivity.masked_fill(~mask, 0.0)
    return sensitivity


def minmax_normalize(scores: Tensor, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Per-image min-max normalisation to [0, 1] over the real tokens.

    S_hat = (S - min S) / (max S - min S + eps); an image whose scores are all equal gets
    all ones (every token equally sensitive), as the method specifies.

    Args:
        scores: ``[B, N]``.
        mask: optional ``[B, N]`` bool, True for real tokens; padded tokens get 0.

    Returns:
        ``[B, N]`` in the dtype of ``scores`` (float32 at least).
    """
    s = at_least_float32(scores)
    if mask is None:
        mask = torch.ones_like(s, dtype=torch.bool)
    inf = torch.finfo(s.dtype).max
    low = s.masked_fill(~mask, inf).amin(dim=-1, keepdim=True)
    high = s.masked_fill(~mask, -inf).amax(dim=-1, keepdim=True)
    spread = high - low
    normalized = torch.where(spread > 0, (s - low) / (spread + eps), torch.ones_like(s))
    return normalized.masked_fill(~mask, 0.0)


def projector_in_dtype(projector: torch.nn.Module, dtype: torch.dtype) -> Projector:
    """The projector evaluated with its parameters cast to ``dtype``; the module is untouched.

    Lets the estimator run a bf16/fp16 model's projector in float32 without copying or
    modifying the model.
    """
    state = {
        name: tensor.to(dtype) if tensor.is_floating_point() else tensor
        for name, tensor in [*projector.named_parameters(), *projector.named_buffers()]
    }
    return lambda x: torch.func.functional_call(projector, state, (x,))


def jvp_sensitivity(
    project: Projector,
    features: Tensor,
    *,
    num_directions: int = 64,
    seed: int = 0,
    chunk_size: int = 8,
    mask: Tensor | None = None,
) -> Tensor:
    """S(i) = (1/m) sum_j ||J_i u_j||_2 by forward-mode differentiation: no step size.

    The same direction bank as :func:`zo_sensitivity`, so the two agree up to the
    finite-difference error. Works for any token-wise projector. Shapes as there.
    """

    def derivative(x: Tensor, u: Tensor) -> Tensor:
        def along(direction: Tensor) -> Tensor:
            # Dual tensors need their own memory: no expanded (aliased) view as tangent.
            tangent = direction.expand_as(x).contiguous()
            return torch.func.jvp(project, (x,), (tangent,))[1]

        # vmap batches only the tangents: the primal pass runs once per chunk, so m
        # directions cost about m tangent passes plus two primal passes per chunk.
        return torch.func.vmap(along)(u)

    return _mean_norm_over_bank(derivative, features, num_directions, seed, chunk_size, mask)
