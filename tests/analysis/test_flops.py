"""flowkern.flops against a count of every product, token by token and key by key, on tiny shapes; a one-token
forward against torch's FLOP counter on a real tiny Llama; monotonicity; the config reading and the refusals."""

from __future__ import annotations

import itertools

import pytest
import torch

from flowkern.flops import DecoderShape, answer_flops, decode_flops, prefill_flops

SHAPE = DecoderShape(hidden=8, intermediate=12, heads=4, kv_heads=2, head_dim=3, layers=3, vocab=11)


def _brute(shape: DecoderShape, tokens: list[int], new_tokens: int) -> int:
    """Every multiply-add of every forward, 2 FLOPs each: each present token through each weight matrix, each query
    against each key it can read (per head: q.k over d, then p*v over d), one row of logits per forward."""
    D, M, H, G, d = shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim
    matrices = [(D, H * d), (D, G * d), (D, G * d), (H * d, D), (D, M), (D, M), (M, D)]
    total = 0
    forwards = [(None, 0)] + [(None, j) for j in range(1, max(new_tokens - 1, 0) + 1)]
    for _, step in forwards:
        for t_l in tokens:
            queries = range(t_l) if step == 0 else [t_l + step - 1]
            for q in queries:
                for rows, cols in matrices:
                    total += 2 * rows * cols
                for _key in range(q + 1):  # causal: the keys present up to and including the query
                    for _head in range(H):
                        total += 2 * d + 2 * d
        total += 2 * D * shape.vocab
    return total


@pytest.mark.parametrize("tokens,new", [([5, 5, 5], 1), ([5, 3, 2], 4), ([0, 0, 0], 2), ([7, 7, 1], 0),
                                        ([1, 2, 3], 3)])
def test_closed_forms_equal_the_brute_force_count(tokens, new):
    assert answer_flops(SHAPE, tokens, new) == _brute(SHAPE, tokens, new)
    assert prefill_flops(SHAPE, tokens) + decode_flops(SHAPE, tokens, max(new - 1, 0)) == answer_flops(
        SHAPE, tokens, new)


def test_monotone_in_tokens_layers_and_new_tokens():
    base = answer_flops(SHAPE, [6, 6, 6], 4)
    for layer, delta in itertools.product(range(3), (1, 2)):
        more = [6, 6, 6]
        more[layer] += delta
        assert answer_flops(SHAPE, more, 4) > base
    assert answer_flops(SHAPE, [6, 6, 6], 5) > base > answer_flops(SHAPE, [6, 6, 6], 3)
    values = [answer_flops(SHAPE, [8, k, k], 3) for k in range(0, 9)]
    assert values == sorted(values) and len(set(values)) == len(values)


def test_one_token_equals_torch_flop_counter_on_a_tiny_llama():
    transformers = pytest.importorskip("transformers")
    from torch.utils.flop_counter import FlopCounterMode

    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=32,
                                      max_position_embeddings=32)
    config._attn_implementation = "eager"  # attention as matmuls, which the counter counts
    model = transformers.LlamaForCausalLM(config).eval()
    shape = DecoderShape.from_config(config)
    assert (shape.head_dim, shape.kv_heads, shape.layers) == (4, 2, 2)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.tensor([[3]]), logits_to_keep=1)
    # one token: its projections and MLP in every layer, one key per head, one row of logits. The rotary table
    # (inv_freq x positions, a matmul in some transformers releases) is no decoder FLOP: flops.py leaves it out
    rotary = sum(sum(counts.values()) for name, counts in counter.get_flop_counts().items()
                 if name.endswith("rotary_emb"))
    assert counter.get_total_flops() - rotary == answer_flops(shape, [1, 1], 1)


def test_config_reading_and_refusals():
    transformers = pytest.importorskip("transformers")
    from flowkern.hf.tiny import tiny_vlm

    config = tiny_vlm("llava", layers=3).config
    text = config.text_config
    shape = DecoderShape.from_config(config)
    assert (shape.hidden, shape.layers, shape.vocab) == (text.hidden_size, text.num_hidden_layers, text.vocab_size)
    with pytest.raises(ValueError, match="tokens_per_layer"):
        prefill_flops(SHAPE, [1, 2])
    with pytest.raises(ValueError, match="new_tokens"):
        answer_flops(SHAPE, [1, 2, 3], -1)
    with pytest.raises(ValueError, match="steps"):
        decode_flops(SHAPE, [1, 2, 3], -2)
    with pytest.raises(ValueError, match="heads"):
        DecoderShape(hidden=8, intermediate=12, heads=0, kv_heads=2, head_dim=3, layers=3, vocab=11)
    with pytest.raises(ValueError, match="config has no"):
        DecoderShape.from_config(transformers.PretrainedConfig())
