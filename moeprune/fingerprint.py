"""Model fingerprints: which model a profile or pattern belongs to.

A fingerprint is the family, the MoE layers with their expert counts, the router top-k and a
hash of the router weights. The hash is taken over the weights rounded to bfloat16, so a
checkpoint stored in fp32 and the same model loaded in bf16 or fp32 agree.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from moeprune.arch import get_adapter, moe_blocks, routing_groups, top_k_of
from moeprune.errors import IncompatibleError, InvalidFile
from moeprune.io.checkpoint import Checkpoint


@dataclass(frozen=True)
class Fingerprint:
    model_type: str
    moe_layers: tuple[int, ...]
    num_experts: tuple[int, ...]  # routed experts per MoE layer, aligned with moe_layers
    top_k: int
    router_hash: str
    groups: tuple[int, int] = (1, 1)  # (n_group, topk_group) of group-limited routing

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["moe_layers"], d["num_experts"] = list(self.moe_layers), list(self.num_experts)
        d["groups"] = list(self.groups)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Fingerprint":
        try:
            return cls(
                model_type=str(d["model_type"]),
                moe_layers=tuple(int(x) for x in d["moe_layers"]),
                num_experts=tuple(int(x) for x in d["num_experts"]),
                top_k=int(d["top_k"]),
                router_hash=str(d["router_hash"]),
                groups=tuple(int(x) for x in d.get("groups", (1, 1))),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidFile(f"malformed model fingerprint {dict(d)!r}: {exc}") from exc

    def describe(self) -> str:
        counts = sorted(set(self.num_experts))
        experts = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        return (f"{self.model_type} with {len(self.moe_layers)} MoE layers x {experts} experts "
                f"(top-{self.top_k}, routers {self.router_hash})")

    def check_compatible(self, other: "Fingerprint", what: str = "pattern") -> None:
        """Raise if ``other`` (the model at hand) is not the model this fingerprint was taken from."""
        if self != other:
            raise IncompatibleError(f"this {what} was made for {self.describe()}, but the model is {other.describe()}",
                                    hint=f"make a new {what} for this model (moeprune profile/select)")


def _hash_routers(weights: Mapping[int, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for layer in sorted(weights):
        w = weights[layer].detach().to("cpu", torch.bfloat16).contiguous()
        h.update(str(layer).encode())
        h.update(w.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def checkpoint_fingerprint(ckpt: Checkpoint) -> Fingerprint:
    """Fingerprint from a checkpoint's files (reads only router weights)."""
    layers = ckpt.moe_layers()
    return Fingerprint(
        model_type=ckpt.config["model_type"],
        moe_layers=tuple(layers),
        num_experts=tuple(layers.values()),
        top_k=top_k_of(ckpt.config),
        router_hash=_hash_routers(ckpt.router_weights()),
        groups=routing_groups(ckpt.config, ckpt.adapter),
    )


def model_fingerprint(model: Any) -> Fingerprint:
    """Fingerprint of an in-memory transformers model."""
    adapter = get_adapter(model.config)
    blocks = moe_blocks(model, adapter)
    weights = {i: adapter.logits_layer(b).weight for i, b in blocks.items()}
    return Fingerprint(
        model_type=model.config.model_type,
        moe_layers=tuple(blocks),
        num_experts=tuple(int(w.shape[0]) for w in weights.values()),
        top_k=top_k_of(model.config),
        router_hash=_hash_routers(weights),
        groups=routing_groups(model.config, adapter),
    )
