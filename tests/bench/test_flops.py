"""The analytic FLOP counts against torch's own FlopCounterMode on real modules.

FlopCounterMode counts the matrix products of the projector, the towers' linear and
convolution layers and the LM exactly; it does not see SDPA on the CPU, so the attention
terms are checked against an explicit count of the score and value products.
"""

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaForConditionalGeneration

from zooprune.bench import flops
from zooprune.tiny import tiny_llava_config


def counted(fn):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def model():
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(tiny_llava_config()).eval()


def test_projector_and_matmul_counts_match_the_flop_counter():
    m = model()
    s = flops.Shapes.of_llava(m.config)
    n = s.vision_tokens - 1
    assert counted(lambda: m.model.multi_modal_projector(torch.randn(1, n, s.vision_dim))) == (
        flops.projector(s, n)
    )
    assert counted(lambda: m.model.vision_tower(torch.randn(1, 3, 48, 48))) == flops.vision_matmuls(
        s
    )
    ids = torch.randint(5, 30, (1, 37))
    lm = counted(lambda: m.model.language_model(input_ids=ids))
    head = counted(lambda: m.lm_head(torch.randn(1, 1, s.text_dim)))
    assert lm + head == flops.lm_matmuls(s, 37)


def test_attention_terms_count_score_and_value_products():
    m = model()
    s = flops.Shapes.of_llava(m.config)
    length = 37
    # causal: query i meets i + 1 keys, in QK^T and again in AV, d multiply-adds each
    causal = sum(2 * (i + 1) * s.text_dim for i in range(length)) * s.text_layers * 2
    attention = flops.prefill(s, length) - flops.lm_matmuls(s, length)
    assert abs(attention - causal) / causal < 2 / length  # L^2 vs L(L+1): within 1/L
    t = s.vision_tokens
    assert (
        flops.vision(s) - flops.vision_matmuls(s) == 2 * s.vision_layers * 2 * t * t * s.vision_dim
    )
    # one decode step over c cached tokens: 2 c d multiply-adds per layer
    assert (
        flops.decode_token(s, 10) - flops.lm_matmuls(s, 1)
        == 2 * 2 * 10 * s.text_dim * s.text_layers
    )


def test_exact_scoring_is_a_small_share_of_a_7b_prefill():
    seven_b = flops.LLAVA15_7B
    share = (flops.scoring(seven_b, 576, "exact") + flops.greedy(seven_b, 576, 64)) / flops.prefill(
        seven_b, 576 + 64
    )
    zo_share = flops.scoring(seven_b, 576, "zo") / flops.prefill(seven_b, 576 + 64)
    assert share < 0.005 < 0.1 < zo_share


def test_scoring_counts_match_the_flop_counter():
    from torch import nn

    from zooprune.select.mlp import as_mlp, exact_sensitivity, low_rank_projector
    from zooprune.select.sensitivity import jvp_sensitivity, zo_sensitivity

    d_v, hidden, d_l, n, m = 16, 40, 24, 30, 16
    s = flops.Shapes(
        vision_dim=d_v,
        vision_layers=1,
        vision_ffn=1,
        vision_tokens=n + 1,
        patch_inputs=1,
        projector_hidden=hidden,
        text_dim=d_l,
        text_layers=1,
        text_ffn=1,
        kv_dim=1,
        vocab=1,
    )
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(d_v, hidden), nn.GELU(), nn.Linear(hidden, d_l))
    x = torch.randn(1, n, d_v)
    mlp = as_mlp(module)
    exact_sensitivity(module, mlp, x)  # build the cached kernel outside the count
    low = low_rank_projector(module, mlp, 8, x.device)
    measured = {
        "exact": counted(lambda: exact_sensitivity(module, mlp, x)),
        "zo": counted(lambda: zo_sensitivity(module, x, num_directions=m)),
        "jvp": counted(lambda: jvp_sensitivity(module, x, num_directions=m)),
        "lowrank": counted(lambda: zo_sensitivity(low, x, num_directions=m)),
    }
    for estimator, value in measured.items():
        assert value == flops.scoring(s, n, estimator, directions=m, rank=8), estimator


def test_the_default_speed_model_is_proportioned_like_llava15_7b():
    from zooprune.bench.speed import llava15_proportioned_config

    config = llava15_proportioned_config()
    with torch.device("meta"):  # shapes only: counted, never computed
        m = LlavaForConditionalGeneration(config).eval()
    s = flops.Shapes.of_llava(config)
    pixels = torch.empty(1, 3, 336, 336, device="meta")
    # on the meta device the counter sees the tower's attention too: the whole count
    assert s.vision_tokens == 577 and counted(lambda: m.model.vision_tower(pixels)) == (
        flops.vision(s)
    )
    share, seven_b = flops.vision_share(s, 40), flops.vision_share(flops.LLAVA15_7B, 40)
    assert abs(share - seven_b) < 0.01  # ~4.4% against ~4.8%
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert head_dim >= 32  # what vLLM's CPU attention needs


def test_video_tower_and_merger_counts_match_the_flop_counter():
    # A tiny Qwen3-VL: 4 frames of 16 px (2 temporal patches of 4 x 4 patches), 2
    # DeepStack levels; the tower's attention (SDPA, unseen by the counter) apart.
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen3VLConfig(
        vision_config={
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "depth": 3,
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_heads": 2,
            "out_hidden_size": 32,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0, 1],
        },
        text_config={
            "vocab_size": 50,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]},
        },
    )
    model = Qwen3VLForConditionalGeneration(config).eval()
    s = flops.QwenVideoShapes.of_qwen3_vl(config)
    frames, side = 4, 16
    grid = torch.tensor([[frames // 2, side // 4, side // 4]])
    pixels = torch.randn(int(grid.prod()), 3 * 2 * 4 * 4)
    tower = counted(lambda: model.model.visual(pixels, grid_thw=grid))
    expected = flops.video_tower(s, frames, side) - flops.video_attention(s, frames, side)
    assert tower == expected + flops.video_mergers(s, frames, side)
    assert flops.video_tokens(s, frames, side) == 2 * 2 * 2  # 2 x 2 merged per patch
    # an odd frame count is padded to whole temporal patches, as the processors do
    assert flops.video_tokens(s, 3, side) == flops.video_tokens(s, 4, side)
    # each temporal patch's 16 patches attend to one another: QK^T and AV, d each
    assert flops.video_attention(s, frames, side) == 3 * 2 * (2 * 2 * 16 * 16 * 16)


def test_the_default_video_model_has_qwen3_vl_8b_s_vision_share():
    from zooprune.integrations.vllm.video_throughput import default_video_config

    mine = flops.QwenVideoShapes.of_qwen3_vl(default_video_config())
    for frames, side in ((8, 224), (16, 448)):
        share = flops.video_vision_share(mine, frames, side, 40)
        assert abs(share - flops.video_vision_share(flops.QWEN3_VL_8B, frames, side, 40)) < 0.04


def test_lm_prefill_counts_each_layer_at_its_own_length():
    # FastV-like: layer 0 holds 20 visual tokens, layer 1 the 7 it kept; each decoder layer
    # run alone at its length under the counter, the attention products counted apart.
    m = model()
    s = flops.Shapes.of_text(m.config)
    lm = m.model.language_model
    text, visual = 9, [20, 7]
    expected = counted(lambda: m.lm_head(torch.randn(1, 1, s.text_dim)))
    for layer, tokens in zip(lm.layers, visual, strict=True):
        length = text + tokens
        hidden = torch.randn(1, length, s.text_dim)
        position = lm.rotary_emb(hidden, torch.arange(length)[None])
        expected += counted(functools.partial(layer, hidden, position_embeddings=position))
        expected += 2 * length * length * s.text_dim  # QK^T and AV, half the square each
    assert flops.lm_prefill(s, text, visual) == expected
    # every layer at one length is the plain prefill
    assert flops.lm_prefill(s, text, [11, 11]) == flops.prefill(s, text + 11)


def test_text_shapes_are_the_language_model_fields_of_the_llava_shapes():
    m = model()
    full, text = flops.Shapes.of_llava(m.config), flops.Shapes.of_text(m.config)
    for field in ("text_dim", "text_layers", "text_ffn", "kv_dim", "vocab"):
        assert getattr(text, field) == getattr(full, field), field
