"""Tiny random models of every supported MoE family, saved as sharded safetensors (Hub key layouts)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from moeprune.arch import get_adapter, moe_blocks

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
_MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            num_key_value_heads=4, num_hidden_layers=3, first_k_dense_replace=1, n_shared_experts=1,
            moe_intermediate_size=16, n_routed_experts=8, n_group=2, topk_group=1)
_V3 = dict(num_hidden_layers=3, first_k_dense_replace=1, n_shared_experts=1, moe_intermediate_size=16,
           n_routed_experts=8, n_group=2, topk_group=1)  # DeepSeek-V3-style routing, standard attention
FAMILIES = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0),
    "deepseek_v2": dict(_MLA, num_experts_per_tok=2, topk_method="group_limited_greedy"),
    "deepseek_v3": dict(_MLA, num_experts_per_tok=2, rope_interleave=True),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=16),
    "glm4_moe": dict(_V3, num_experts_per_tok=2, head_dim=8),
    "glm4_moe_lite": dict(_MLA, num_experts_per_tok=2),
    "deepseek_v32": dict(_MLA, num_experts_per_tok=2, index_topk=8, index_head_dim=8, index_n_heads=2),
    "dots1": dict(_V3, num_experts_per_tok=2, head_dim=8),
    "solar_open": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                       n_group=2, topk_group=1, head_dim=8),  # every layer MoE
    "qwen3_next": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=32, head_dim=8,
                       layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8),
    "flex_olmo": dict(num_experts=8, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0),
    "minimax_m2": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8, bos_token_id=1, eos_token_id=2),
    "exaone_moe": dict(_V3, num_experts=8, num_experts_per_tok=2, num_shared_experts=1, head_dim=8),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=1,
                         num_hidden_layers=3, moe_layer_start_index=1),  # layer 0 dense
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=[2, 2], head_dim=8),  # per-layer top-k, as on the Hub
}


def make_model(family: str, seed: int = 0, **overrides):
    cfg = AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    adapter = get_adapter(cfg)
    with torch.no_grad():  # random init leaves some biases at zero: make routing non-trivial
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        for block in moe_blocks(model, adapter).values():
            adapter.logits_layer(block).weight.mul_(20)  # token-dependent routing (else biases alone decide)
        for b in model.buffers():  # e_score_correction_bias, as large as score gaps: were a pruned
            if b.dtype.is_floating_point and b.dim() == 1 and b.numel() == 8:  # expert's left unmasked, it
                b.copy_(0.3 * torch.randn_like(b))  # would win slots, so the tests catch a mishandled bias
    return model


def save_model(model, path: Path, shard_size: str = "20KB") -> Path:
    model.save_pretrained(path, max_shard_size=shard_size)
    return path


def write_token_demos(path: Path, n: int = 6, length: int = 24, seed: int = 0, low: int = 2,
                      high: int = VOCAB) -> Path:
    """Random token demos drawn from ``[low, high)`` (disjoint ranges make distinguishable tasks)."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"input_ids": torch.randint(low, high, (length,), generator=g).tolist()}) + "\n")
    return path


@contextlib.contextmanager
def masked_routers(model, kept: dict[int, list[int]]):
    """Reference: the full model with pruned experts' router logits set to -inf.

    Their entries in every other router tensor are -inf too: a selection bias (DeepSeek-V3's, MiniMax-M2's
    on the block, ERNIE-4.5's [1, E]) is added to the scores after the sigmoid/softmax, where it would
    leave a pruned expert selectable.
    """
    adapter = get_adapter(model.config)
    restore = []
    for layer, block in moe_blocks(model, adapter).items():
        router = getattr(block, adapter.router)
        weight = adapter.logits_layer(block).weight
        pruned = torch.ones(weight.shape[0], dtype=torch.bool)
        pruned[kept[layer]] = False
        original = router.forward

        def forward(*args, _orig=original, _pruned=pruned, **kwargs):
            real = F.linear

            def linear(x, w, b=None):
                return real(x, w, b).masked_fill(_pruned.to(x.device), float("-inf"))

            torch.nn.functional.linear = linear
            try:
                return _orig(*args, **kwargs)
            finally:
                torch.nn.functional.linear = real

        router.forward = forward
        others = [(t, axis, t.detach().clone()) for t, axis in adapter.router_state(block).values() if t is not weight]
        for t, axis, _ in others:
            t.data.movedim(axis, -1).masked_fill_(pruned, float("-inf"))
        restore.append((router, others))
    try:
        yield model
    finally:
        for router, others in restore:
            del router.forward
            for t, _, saved in others:
                t.data.copy_(saved)


_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def save_mxfp4(model, path: Path) -> Path:
    """Save a GPT-OSS model the way the Hub ships it: expert matrices as MXFP4 ``*_blocks`` (two
    E2M1 codes per byte, low nibble first) + ``*_scales`` (E8M0 exponents + 127) per 32 inputs,
    one tensor per shard (so blocks and scales sit in different files), and an mxfp4
    ``quantization_config``."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in model.state_dict().items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            w = value.detach().float().transpose(1, 2)  # memory [E, in, out] -> stored [E, out, in]
            groups = w.reshape(*w.shape[:2], -1, 32)
            exp = torch.ceil(torch.log2(groups.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
            codes = ((groups / torch.exp2(exp)).unsqueeze(-1) - _FP4).abs().argmin(-1).to(torch.uint8)
            tensors[key + "_blocks"] = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
            tensors[key + "_scales"] = (exp.squeeze(-1) + 127).to(torch.uint8)
        else:
            tensors[key] = value.detach().contiguous()
    weight_map = {}
    for i, (key, value) in enumerate(sorted(tensors.items())):
        name = f"model-{i + 1:05d}-of-{len(tensors):05d}.safetensors"
        save_file({key: value}, str(path / name), metadata={"format": "pt"})
        weight_map[key] = name
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    return path


def save_fp8(model, path: Path, block: int = 8) -> Path:
    """Save a model the way DeepSeek-V3 and MiniMax-M2 ship it: every projection and expert matrix of the
    decoder layers in float8_e4m3fn with a ``weight_scale_inv`` per ``block x block`` tile, and an fp8
    ``quantization_config`` (router, norms, embeddings and head stay float)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    from safetensors.torch import load_file

    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(path / shard))
        for key in [k for k, v in tensors.items() if k.startswith("model.layers.") and v.dim() == 2
                    and (k.endswith("proj.weight") or ".experts." in k)]:
            w = tensors[key].float()
            tiles = w.reshape(w.shape[0] // block, block, w.shape[1] // block, block)
            scale = tiles.abs().amax((1, 3)).clamp_min(1e-12) / 448.0
            tensors[key] = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(w.shape)
            tensors[key + "_scale_inv"] = scale
            index["weight_map"][key + "_scale_inv"] = shard
        save_file(tensors, str(path / shard), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (path / "config.json").write_text(json.dumps(config))
    return path
