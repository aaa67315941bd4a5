"""The zeroth-order estimator against autograd Jacobians of a small GELU projector."""

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from zooprune.select.sensitivity import (
    direction_bank,
    jvp_sensitivity,
    projector_in_dtype,
    zo_sensitivity,
)

D_V, HIDDEN, D_L = 6, 16, 10


def projector(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_V, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, D_L)).to(dtype)


def jacobians(module, x):
    """``[N, d_l, d_v]``, one autograd Jacobian per token."""
    return torch.stack([jacobian(module, row) for row in x])


def test_central_difference_equals_mean_jacobian_norm_over_the_same_bank():
    module = projector()
    x = torch.randn(1, 9, D_V, dtype=torch.float64)
    bank = direction_bank(32, D_V, seed=5).double()
    exact = (jacobians(module, x[0]) @ bank.T).norm(dim=1).mean(dim=-1)  # mean_j ||J_i u_j||
    zo = zo_sensitivity(
        module, x, num_directions=32, step=1e-4, seed=5, compute_dtype=torch.float64
    )
    torch.testing.assert_close(zo[0].double(), exact, rtol=1e-6, atol=0)


def test_converges_to_the_expected_jacobian_norm_as_m_grows():
    module = projector(1)
    x = torch.randn(1, 5, D_V, dtype=torch.float64) * 2
    jac = jacobians(module, x[0])
    many = direction_bank(200_000, D_V, seed=99).double()
    expected = (jac @ many.T).norm(dim=1).mean(dim=-1)  # E_u ||J_i u|| by brute force
    errors = []
    for m in (4, 64, 4096):
        est = zo_sensitivity(
            module,
            x,
            num_directions=m,
            step=1e-3,
            seed=m,
            compute_dtype=torch.float64,
            chunk_size=512,
        )
        errors.append(((est[0].double() - expected).abs() / expected).max().item())
    assert errors[-1] < 0.03
    assert errors[-1] < errors[0]
    # ...and it tracks the Frobenius norm: E||J u||^2 = ||J||_F^2 / d_v for unit u.
    frobenius = jac.flatten(1).norm(dim=-1) / D_V**0.5
    assert ((expected - frobenius).abs() / frobenius).max() < 0.25


def test_error_shrinks_with_the_step():
    module = projector(2)
    x = torch.randn(1, 7, D_V, dtype=torch.float64) * 3
    bank = direction_bank(16, D_V, seed=0).double()
    exact = (jacobians(module, x[0]) @ bank.T).norm(dim=1).mean(dim=-1)
    errors = [
        (
            zo_sensitivity(module, x, num_directions=16, step=h, compute_dtype=torch.float64)[
                0
            ].double()
            - exact
        )
        .abs()
        .max()
        .item()
        for h in (1.0, 0.1, 0.01)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4


def test_float32_default_is_sound_for_a_bfloat16_model():
    module = projector(3, torch.bfloat16)
    x = torch.randn(2, 12, D_V).bfloat16()
    exact_module = projector(3, torch.float64)
    exact_module.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
    bank = direction_bank(64, D_V, seed=0).double()
    exact = torch.stack(
        [(jacobians(exact_module, xi.double()) @ bank.T).norm(dim=1).mean(-1) for xi in x]
    )
    fp32 = zo_sensitivity(projector_in_dtype(module, torch.float32), x)
    bf16 = zo_sensitivity(
        projector_in_dtype(module, torch.bfloat16), x, compute_dtype=torch.bfloat16
    )
    fp32_error = ((fp32.double() - exact).abs() / exact).max()
    bf16_error = ((bf16.double() - exact).abs() / exact).max()
    assert fp32_error < 1e-3
    assert bf16_error > 10 * fp32_error  # rounding the perturbed inputs loses the signal


def test_authors_fp16_mode_runs_and_is_reproducible():
    module = projector(4, torch.float32)
    x = torch.randn(1, 10, D_V)
    fp16 = projector_in_dtype(module, torch.float16)
    a = zo_sensitivity(fp16, x, compute_dtype=torch.float16, seed=1)
    b = zo_sensitivity(fp16, x, compute_dtype=torch.float16, seed=1)
    assert torch.equal(a, b) and a.dtype == torch.float32 and bool(torch.isfinite(a).all())
    # The rounding really happens: fp16 differs from fp32, by far more than fp32 noise.
    fp32 = zo_sensitivity(module, x, seed=1)
    assert ((a - fp32).abs() / fp32).max() > 1e-2


def test_seeded_batch_invariant_and_masked():
    module = projector(5, torch.float32)
    x = torch.randn(3, 8, D_V)
    together = zo_sensitivity(module, x, num_directions=8, seed=4)
    for b in range(3):
        torch.testing.assert_close(
            zo_sensitivity(module, x[b : b + 1], num_directions=8, seed=4)[0], together[b]
        )
    assert not torch.equal(together, zo_sensitivity(module, x, num_directions=8, seed=5))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False
    masked = zo_sensitivity(module, x, num_directions=8, seed=4, mask=mask)
    assert (masked[1, 5:] == 0).all() and torch.equal(masked[mask], together[mask])


def test_chunking_does_not_change_the_result():
    module = projector(6, torch.float64)
    x = torch.randn(2, 5, D_V, dtype=torch.float64)
    one = zo_sensitivity(module, x, num_directions=10, chunk_size=1, compute_dtype=torch.float64)
    all_at_once = zo_sensitivity(
        module, x, num_directions=10, chunk_size=10, compute_dtype=torch.float64
    )
    torch.testing.assert_close(one, all_at_once)


def test_projector_in_dtype_leaves_the_module_alone():
    module = projector(7, torch.bfloat16)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    out = projector_in_dtype(module, torch.float32)(torch.randn(4, D_V))
    assert out.dtype == torch.float32
    assert all(
        torch.equal(before[k], v) and v.dtype == torch.bfloat16
        for k, v in module.state_dict().items()
    )


@pytest.mark.parametrize("bad", [{"num_directions": 0}, {"step": 0.0}, {"chunk_size": 0}])
def test_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        zo_sensitivity(projector(), torch.randn(1, 3, D_V, dtype=torch.float64), **bad)


def test_one_direction_is_enough_and_jvp_defaults_are_the_documented_ones():
    module = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)).double()
    x = torch.randn(1, 5, 4, dtype=torch.float64)
    one = jvp_sensitivity(module, x, num_directions=1)
    bank = direction_bank(1, 4, seed=0).double()
    expected = torch.stack([torch.func.jvp(module, (row,), (bank[0],))[1].norm() for row in x[0]])
    torch.testing.assert_close(one[0], expected)
    assert zo_sensitivity(module, x, num_directions=1, compute_dtype=torch.float64).shape == (1, 5)
    torch.testing.assert_close(
        jvp_sensitivity(module, x), jvp_sensitivity(module, x, num_directions=64, seed=0)
    )


def test_jvp_scores_padded_tokens_zero():
    module = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    scores = jvp_sensitivity(module, x, num_directions=4, mask=mask)
    assert bool((scores[1, 3:] == 0).all()) and bool((scores[mask] > 0).all())
    torch.testing.assert_close(scores[:, :3], jvp_sensitivity(module, x, num_directions=4)[:, :3])


def test_the_bank_is_the_same_whatever_the_default_dtype():
    bank = direction_bank(8, 5, seed=3)
    torch.set_default_dtype(torch.float64)
    try:
        assert torch.equal(direction_bank(8, 5, seed=3), bank)
    finally:
        torch.set_default_dtype(torch.float32)
    assert bank.dtype == torch.float32


def test_projector_in_dtype_casts_floating_tensors_only():
    module = nn.Linear(3, 2)
    module.register_buffer("step", torch.tensor([4], dtype=torch.long))
    seen = {}
    original = nn.Linear.forward

    def spy(self, x):
        seen.update(weight=self.weight.dtype, step=self.step.dtype)
        return original(self, x)

    module.forward = spy.__get__(module)
    projector_in_dtype(module, torch.float64)(torch.randn(1, 3, dtype=torch.float64))
    assert seen == {"weight": torch.float64, "step": torch.long}
