"""Exact, forward-mode and low-rank sensitivity against brute-force autograd Jacobians."""

import copy

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from zooprune.select import METHODS
from zooprune.select.methods import sensitivity_scores
from zooprune.select.mlp import (
    GRAM_KERNELS,
    as_mlp,
    exact_sensitivity,
    gelu_derivative,
    low_rank_factors,
    low_rank_projector,
)
from zooprune.select.registry import TokenSet
from zooprune.select.sensitivity import direction_bank, jvp_sensitivity, zo_sensitivity
from zooprune.testbed.model import load_testbed, vision_features
from zooprune.testbed.scenes import make_scene

D_V, HIDDEN, D_L = 7, 12, 9


def mlp(approximate="none", seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(D_V, HIDDEN), nn.GELU(approximate=approximate), nn.Linear(HIDDEN, D_L)
    ).to(dtype)


def jacobians(module, x):
    return torch.stack([jacobian(module, row) for row in x])  # [N, d_l, d_v]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_exact_equals_frobenius_norm_of_the_autograd_jacobian(approximate, bias):
    module = mlp(approximate)
    if not bias:  # a projector without biases (the Gram kernel has no b1 then)
        module[0].bias = module[2].bias = None
    x = torch.randn(2, 6, D_V, dtype=torch.float64) * 2
    expected = torch.stack([jacobians(module, xi).flatten(1).norm(dim=-1) for xi in x]) / D_V**0.5
    got = exact_sensitivity(module, as_mlp(module), x)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["erf", "tanh"])
def test_gelu_derivative_matches_autograd(kind):
    a = torch.linspace(-5, 5, 101, dtype=torch.float64, requires_grad=True)
    approximate = "none" if kind == "erf" else "tanh"
    (grad,) = torch.autograd.grad(nn.functional.gelu(a, approximate=approximate).sum(), a)
    torch.testing.assert_close(gelu_derivative(a.detach(), kind), grad)


def test_jvp_equals_jacobian_times_directions_exactly():
    module = mlp(seed=1)
    x = torch.randn(1, 5, D_V, dtype=torch.float64)
    bank = direction_bank(16, D_V, seed=2).double()
    expected = (jacobians(module, x[0]) @ bank.T).norm(dim=1).mean(dim=-1)
    got = jvp_sensitivity(module, x, num_directions=16, seed=2, chunk_size=5)
    torch.testing.assert_close(got[0], expected, rtol=1e-12, atol=0)


def test_exact_is_the_root_mean_square_directional_derivative():
    # E||J u||^2 = ||J||_F^2 / d_v holds exactly for unit u; the bank's sample mean of
    # ||J u_j||^2 converges to it, so exact must sit within sampling error of it.
    module = mlp(seed=8)
    x = torch.randn(1, 6, D_V, dtype=torch.float64)
    bank = direction_bank(20_000, D_V, seed=1).double()
    squares = (jacobians(module, x[0]) @ bank.T).pow(2).sum(dim=1).mean(dim=-1)
    exact = exact_sensitivity(module, as_mlp(module), x)[0].double()
    torch.testing.assert_close(exact, squares.sqrt(), rtol=0.01, atol=0)


def test_zo_approaches_exact_as_m_grows_and_h_shrinks():
    module = mlp(seed=2)
    x = torch.randn(1, 6, D_V, dtype=torch.float64)
    exact = exact_sensitivity(module, as_mlp(module), x).double()
    # E||J u|| sits a little below ||J||_F / sqrt(d_v) (Jensen); a few percent here.
    rough = zo_sensitivity(module, x, num_directions=8, step=0.5, compute_dtype=torch.float64)
    fine = zo_sensitivity(
        module, x, num_directions=8192, step=1e-3, compute_dtype=torch.float64, chunk_size=1024
    )
    rough_error = ((rough - exact).abs() / exact).max()
    fine_error = ((fine - exact).abs() / exact).max()
    assert fine_error < 0.1 and fine_error < rough_error
    # Ranking is what selection uses: the fine estimate orders tokens as the exact one does.
    assert torch.equal(fine.argsort(), exact.argsort())


def test_lowrank_at_full_rank_is_the_projector_and_at_low_rank_an_approximation():
    module = mlp(seed=3, dtype=torch.float32)
    x = torch.randn(2, 4, D_V)
    full = low_rank_projector(module, as_mlp(module), rank=HIDDEN, device=x.device)
    torch.testing.assert_close(full(x), module(x), atol=1e-5, rtol=1e-5)
    low = low_rank_projector(module, as_mlp(module), rank=2, device=x.device)
    assert (low(x) - module(x)).abs().max() > 1e-3


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two score vectors (no ties in continuous scores)."""
    ra, rb = (v.argsort().argsort().double() for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_lowrank_factors_are_the_top_singular_directions(rank):
    # Eckart-Young: the best rank-r approximation keeps the r largest singular values, and
    # its squared Frobenius error is the sum of the squares of the others.
    module = mlp(seed=9, dtype=torch.float32)
    a1, c1, a2, c2 = low_rank_factors(as_mlp(module), torch.device("cpu"), rank)
    for (a, c), linear in (((a1, c1), module[0]), ((a2, c2), module[2])):
        w = linear.weight.detach().double()
        values = torch.linalg.svdvals(w)
        approximation = (a @ c).double().T  # x @ A @ C == x @ W_r^T
        kept = torch.linalg.svdvals(approximation)[:rank]
        torch.testing.assert_close(kept, values[:rank], rtol=1e-4, atol=1e-6)
        error = (w - approximation).pow(2).sum()
        torch.testing.assert_close(error, values[rank:].pow(2).sum(), rtol=1e-3, atol=1e-5)


def lowrank_against_exact(module: nn.Module, x: torch.Tensor, rank: int) -> list[float]:
    """Per image, Spearman's correlation of ``lowrank`` at ``rank`` with ``exact``."""
    exact = exact_sensitivity(module, as_mlp(module), x)
    project = low_rank_projector(module, as_mlp(module), rank, x.device)
    low = zo_sensitivity(project, x, num_directions=64, seed=0)
    return [spearman(e, lo) for e, lo in zip(exact, low, strict=True)]


def test_lowrank_ranks_tokens_as_exact_does_on_a_random_projector():
    # LLaVA's shape, 64 -> 128 -> 128, at a quarter of the hidden width. Measured 0.90 and
    # 0.85; keeping the smallest singular values instead gives 0.15 and 0.29.
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128))
    x = torch.randn(2, 200, 64)
    assert min(lowrank_against_exact(module, x, rank=32)) > 0.75


def test_lowrank_ranks_tokens_as_exact_does_on_the_test_bed():
    # The bundled model's projector (192 -> 256 -> 256) on four scenes' tower features, at
    # rank 64: measured 0.95 to 0.97; the smallest singular values instead: 0.21 to 0.38.
    model, processor = load_testbed()
    pictures = [make_scene(seed).to_pil() for seed in range(4)]
    pixels = processor(images=pictures, text=["<image>"] * 4, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features, _ = vision_features(model, pixels)
    projector = model.model.multi_modal_projector
    assert min(lowrank_against_exact(projector, features, rank=64)) > 0.9


def test_gram_kernel_is_cached_and_rebuilt_when_weights_change():
    module = mlp(seed=4, dtype=torch.float32)
    x = torch.randn(1, 5, D_V)
    builds = GRAM_KERNELS.builds
    first = exact_sensitivity(module, as_mlp(module), x)
    again = exact_sensitivity(module, as_mlp(module), x)
    assert GRAM_KERNELS.builds == builds + 1 and torch.equal(first, again)
    with torch.no_grad():
        module[2].weight.mul_(2.0)  # in place: same tensor, new version
    doubled = exact_sensitivity(module, as_mlp(module), x)
    assert GRAM_KERNELS.builds == builds + 2
    torch.testing.assert_close(doubled, 2 * first)
    module.load_state_dict(mlp(seed=5, dtype=torch.float32).state_dict())
    exact_sensitivity(module, as_mlp(module), x)
    assert GRAM_KERNELS.builds == builds + 3


def test_gram_kernel_cache_sees_replaced_parameters_data_edits_and_dtype_changes():
    module = mlp(seed=6, dtype=torch.float32)
    x = torch.randn(1, 5, D_V)

    def check():
        got = exact_sensitivity(module, as_mlp(module), x)
        reference = mlp(seed=0, dtype=torch.float32)
        reference.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
        torch.testing.assert_close(got, exact_sensitivity(reference, as_mlp(reference), x))

    check()
    for scale in (2.0, 3.0):  # a new Parameter each time; ids may be reused after GC
        module[2].weight = nn.Parameter(module[2].weight.detach() * scale)
        check()
    with torch.no_grad():
        module[0].weight.data.mul_(0.5)  # .data has its own version counter
    check()
    module.to(torch.float64)
    check()
    with torch.inference_mode():
        frozen = mlp(seed=7, dtype=torch.float32)
    assert exact_sensitivity(frozen, as_mlp(frozen), x).shape == (1, 5)


def test_as_mlp_recognises_only_plain_gelu_mlps():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=8, num_attention_heads=2),
        text_config=LlamaConfig(hidden_size=16, num_attention_heads=2),
    )
    assert as_mlp(LlavaMultiModalProjector(config)).gelu == "erf"
    assert as_mlp(mlp("tanh")).gelu == "tanh"
    assert as_mlp(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))) is None
    assert (
        as_mlp(nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))) is None
    )
    assert as_mlp(nn.Linear(3, 3)) is None


def test_auto_picks_exact_for_mlps_and_jvp_otherwise():
    x = torch.randn(1, 5, D_V)
    tokens = TokenSet(features=x, projected=x, projector=mlp(dtype=torch.float32), grid=(1, 5))
    assert sensitivity_scores(tokens)[1] == "exact"
    other = nn.Sequential(nn.LayerNorm(D_V), nn.Linear(D_V, D_L), nn.GELU())
    tokens = TokenSet(features=x, projected=x, projector=other, grid=(1, 5))
    scores, ran = sensitivity_scores(tokens)
    assert ran == "jvp" and scores.shape == (1, 5)
    from zooprune.errors import PruneError

    with pytest.raises(PruneError, match="needs a Linear -> GELU -> Linear projector"):
        sensitivity_scores(tokens, estimator="exact")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_lowrank_at_full_rank_is_any_float64_projector_evaluated_in_float32(approximate, bias):
    torch.manual_seed(11)
    module = nn.Sequential(
        nn.Linear(D_V, HIDDEN, bias=bias),
        nn.GELU(approximate=approximate),
        nn.Linear(HIDDEN, D_L, bias=bias),
    ).double()
    x = torch.randn(1, 4, D_V, dtype=torch.float64)
    full = low_rank_projector(module, as_mlp(module), rank=HIDDEN, device=x.device)
    out = full(x.float())
    assert out.dtype == torch.float32  # evaluates in float32, whatever the weights
    torch.testing.assert_close(out.double(), module(x), rtol=1e-5, atol=1e-5)
    one = low_rank_projector(module, as_mlp(module), rank=1, device=x.device)
    assert one(x.float()).shape == (1, 4, D_L)
    with pytest.raises(ValueError, match="rank must be positive"):
        low_rank_projector(module, as_mlp(module), rank=0, device=x.device)


def test_a_new_cache_has_built_nothing():
    from zooprune.select.mlp import _PerWeightsCache

    cache = _PerWeightsCache(lambda mlp, device: 1)
    assert cache.builds == 0
    module = mlp(dtype=torch.float32)
    assert cache.get(module, as_mlp(module), torch.device("cpu")) == 1 and cache.builds == 1


def test_the_sensitivity_methods_pass_every_option_to_the_estimator():
    # A norm in front: not a GELU MLP, so the default estimator is jvp.
    torch.manual_seed(12)
    projector = nn.Sequential(nn.LayerNorm(D_V), nn.Linear(D_V, D_L), nn.GELU())
    x = torch.randn(1, 9, D_V)
    tokens = TokenSet(features=x, projected=projector(x).detach(), projector=projector, grid=(3, 3))
    zoo = METHODS["zoo"]
    default = zoo(tokens, 3)
    jvp = jvp_sensitivity(projector, x, num_directions=64, seed=0)
    torch.testing.assert_close(default.scores, jvp)  # the documented defaults: 64, seed 0
    assert default.details == {"estimator": "jvp"}
    chosen = zoo(tokens, 3, estimator="jvp", num_directions=5, seed=7)
    torch.testing.assert_close(
        chosen.scores, jvp_sensitivity(projector, x, num_directions=5, seed=7)
    )
    zo = zoo(tokens, 3, estimator="zo", num_directions=6, seed=2, step=0.5)
    expected = zo_sensitivity(projector, x, num_directions=6, seed=2, step=0.5)
    torch.testing.assert_close(zo.scores, expected)
    half = zoo(tokens, 3, estimator="zo", num_directions=6, zo_dtype="float16")
    assert not torch.equal(half.scores, zoo(tokens, 3, estimator="zo", num_directions=6).scores)
    mlp_projector = mlp(seed=13, dtype=torch.float32)
    tokens = TokenSet(features=x, projected=x, projector=mlp_projector, grid=(3, 3))
    low = zoo(tokens, 3, estimator="lowrank", rank=2, num_directions=6)
    project = low_rank_projector(mlp_projector, as_mlp(mlp_projector), 2, x.device)
    torch.testing.assert_close(low.scores, zo_sensitivity(project, x, num_directions=6))
    assert zoo(tokens, 3, estimator="lowrank", num_directions=6).scores.shape == (1, 9)


def test_as_mlp_refuses_more_than_linear_gelu_linear():
    class Projector(nn.Module):
        def __init__(self, second: nn.Module, extra: bool) -> None:
            super().__init__()
            self.linear_1, self.act, self.linear_2 = nn.Linear(3, 4), nn.GELU(), second
            if extra:
                self.norm = nn.LayerNorm(3)

    assert as_mlp(Projector(nn.Linear(4, 2), extra=False)) is not None
    assert as_mlp(Projector(nn.Linear(4, 2), extra=True)) is None
    assert as_mlp(Projector(nn.Identity(), extra=False)) is None
    assert as_mlp(nn.Sequential(nn.Identity(), nn.GELU(), nn.Linear(4, 2))) is None


def test_the_cache_sees_an_edit_that_keeps_the_sampled_sum():
    module = mlp(seed=14, dtype=torch.float32)
    x = torch.randn(1, 4, D_V)
    first = exact_sensitivity(module, as_mlp(module), x)
    with torch.no_grad():  # swap two weights: the sum of every sample stays the same
        w = module[0].weight
        w[0, 0], w[1, 1] = w[1, 1].clone(), w[0, 0].clone()
    fresh = mlp(seed=0, dtype=torch.float32)
    fresh.load_state_dict(module.state_dict())
    torch.testing.assert_close(
        exact_sensitivity(module, as_mlp(module), x), exact_sensitivity(fresh, as_mlp(fresh), x)
    )
    assert not torch.equal(exact_sensitivity(module, as_mlp(module), x), first)


def autograd_exact(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """||J_i||_F / sqrt(d_v) per token from autograd Jacobians (float64), ``[B, N]``."""
    module = copy.deepcopy(module).double()
    rows = x.double().reshape(-1, x.shape[-1])
    jac = torch.func.vmap(torch.func.jacrev(module))(rows)  # [T, d_l, d_v]
    return (jac.flatten(1).norm(dim=-1) / x.shape[-1] ** 0.5).reshape(x.shape[:-1])


def test_exact_factored_form_over_several_blocks_and_passes():
    from zooprune.select import mlp as mlp_module

    # H = 300: two full blocks of L's columns and a partial one; 2100 tokens an image:
    # three passes of the chunked form each, the last partial.
    torch.manual_seed(10)
    module = nn.Sequential(nn.Linear(8, 300), nn.GELU(), nn.Linear(300, 300))
    x = torch.randn(2, 2100, 8) * 2
    gram = GRAM_KERNELS.get(module, as_mlp(module), x.device)
    assert gram.factor is not None and gram.kernel is None
    assert 300 % mlp_module.FACTOR_BLOCK and 1024 == mlp_module.EXACT_CHUNK
    got = exact_sensitivity(module, as_mlp(module), x)
    torch.testing.assert_close(got.double(), autograd_exact(module, x), rtol=2e-5, atol=0)
    # an image's scores do not depend on the batch it came in
    assert torch.equal(exact_sensitivity(module, as_mlp(module), x[1:]), got[1:])


def test_exact_form_of_a_kernel_that_does_not_factor():
    # A hidden unit no input reaches: a zero row of W1 makes K singular (no Cholesky);
    # the quadratic form is then taken with K itself.
    torch.manual_seed(11)
    module = nn.Sequential(nn.Linear(6, 20), nn.GELU(), nn.Linear(20, 5))
    with torch.no_grad():
        module[0].weight[3] = 0
    x = torch.randn(1, 30, 6)
    gram = GRAM_KERNELS.get(module, as_mlp(module), x.device)
    assert gram.factor is None and gram.kernel is not None
    got = exact_sensitivity(module, as_mlp(module), x)
    torch.testing.assert_close(got.double(), autograd_exact(module, x), rtol=2e-5, atol=0)


def test_exact_of_a_half_precision_projector_is_that_of_its_float32_copy():
    # The weights are read in float32 before anything else, so a bfloat16 projector scores
    # exactly as its float32 upcast does (the closed form loses nothing to the model's dtype).
    torch.manual_seed(12)
    module = nn.Sequential(nn.Linear(6, 40), nn.GELU(), nn.Linear(40, 24)).bfloat16()
    upcast = copy.deepcopy(module).float()
    x = torch.randn(1, 30, 6).bfloat16()
    got = exact_sensitivity(module, as_mlp(module), x)
    assert torch.equal(got, exact_sensitivity(upcast, as_mlp(upcast), x))
