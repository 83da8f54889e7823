"""The adapter owns the checkpoint key layout."""

from moeprune.arch import ADAPTERS, layer_of


def test_layer_of_reads_the_decoder_layer_of_a_key():
    assert layer_of("model.layers.12.mlp.experts.3.up_proj.weight") == 12
    assert layer_of("model.layers.0.self_attn.q_proj.weight") == 0
    assert layer_of("model.embed_tokens.weight") is None and layer_of("lm_head.weight") is None
    assert layer_of("model.layers.x.mlp.gate.weight") is None and layer_of("mtp.layers.0.mlp.gate.weight") is None


def test_router_weight_layer_matches_exactly_each_familys_router_matrix():
    for adapter in ADAPTERS:
        key = adapter.block_prefix(7) + adapter.router_weight
        assert adapter.router_weight_layer(key) == 7, adapter.family
        assert adapter.router_weight_layer(key + "_scale") is None
        assert adapter.router_weight_layer(adapter.experts_prefix(7) + "0.down_proj.weight") is None
