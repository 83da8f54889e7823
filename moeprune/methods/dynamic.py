"""Fewer active experts per token at run time: dynamic pruning of routed token-expert pairs.

Rules (``DynamicPrune.method``), each dropping some of the pairs the router chose; a dropped pair is
handed to the experts with the expert id ``E`` (the expert-parallel sentinel every experts
implementation skips: moeprune's torch and Triton kernels never compute it) and weight 0:

- ``odp`` — MC-MoE's Online Dynamic Pruning: a routed expert whose weight is below ``threshold`` (β)
  times the token's top weight is dropped, except for the important tokens, the ``protect`` share of
  each sequence with the largest attention received (mean over heads, summed over the queries that
  see the token, divided by their number) times the L1 norm of the token's MoE input, which keep
  every routed expert. Attention probabilities are read from the eager attention (the model is
  switched to it while ODP protects tokens); a step of one token (decoding) has no protection, as
  in the paper's code. ``drop_low`` (default 0): the least important share of each sequence runs no
  expert at all, as MC-MoE's code (``DynamicRankMixtralSparseMoeBlockWrapper``) does with its
  ``tau_l`` = 0.1. Deviations from the code: β is calibrated to a share F rather than fixed (0.5 there);
  importance is the attention each token *receives*, which the code's divisor (the number of queries
  that see the token, T - i) implies, where its ``torch.sum(mean_tensor, dim=1)`` sums each query's
  attention row (1 for every query), leaving the L1 norm / (T - i); kept weights are not renormalised
  (below). On both benchmark models the protection costs more than it saves at equal F (the naive
  rule is better) and ``drop_low`` far more: BENCHMARKS.md "ODP variants".
- ``naive`` — the same weight-ratio rule without protection (the baseline).
- ``topany`` — MC#'s Online Top-any Pruning: a small per-layer head (:mod:`moeprune.methods.topany`) picks
  per token how many of its top-k experts run.

The kept weights stay as the router gave them; ``renormalize=True`` rescales a token's kept weights to
the sum its routed weights had (as MC-MoE's code renormalises; on the embedded model it cost more:
BENCHMARKS.md, dynamic pruning). The threshold is
calibrated on demos (:func:`calibrate`) so that a fraction ``fraction`` of the routed pairs is
dropped on them. ``threshold = 0`` drops nothing and leaves the model's outputs bit for bit unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from moeprune.arch import get_adapter, moe_blocks
from moeprune.errors import InvalidArgument

METHODS = ("odp", "naive", "topany")


@dataclass
class DynamicPrune:
    """A dynamic-pruning rule and its calibrated threshold (stored in an export's ``moeprune`` config)."""

    method: str = "odp"
    threshold: float = 0.0  # odp/naive: β (ratio to the top weight); topany: the head's bias per extra expert
    fraction: float = 0.0  # the share of routed pairs it was calibrated to drop
    protect: float = 0.1  # odp: share of each sequence's tokens (the most important) keeping every expert
    drop_low: float = 0.0  # odp: share of each sequence's tokens (the least important) skipping every expert
    renormalize: bool = False
    calibration: dict[str, Any] = field(default_factory=dict)  # tokens, demos, achieved fraction
    heads: dict[int, dict[str, torch.Tensor]] | None = None  # topany: per MoE layer, the head's state

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgument(f"dynamic pruning method {self.method!r} is not one of {', '.join(METHODS)}")
        if not 0.0 <= self.fraction < 1.0:
            raise InvalidArgument(f"dynamic_prune={self.fraction}: give the share of routed expert calls to skip, "
                                  "in [0, 1)")
        if not 0.0 <= self.protect < 1.0:
            raise InvalidArgument(f"protect {self.protect}: the share of important tokens must be in [0, 1)")
        if not 0.0 <= self.drop_low < 1.0 or self.protect + self.drop_low > 1.0:
            raise InvalidArgument(f"drop_low {self.drop_low}: the share of unimportant tokens must be in [0, 1) and, "
                                  f"with protect {self.protect}, at most 1")
        if self.drop_low > 0 and self.method != "odp":
            raise InvalidArgument(f"drop_low is ODP's; {self.method} has no token importance")
        if self.method == "topany" and self.fraction > 0 and not self.heads:
            raise InvalidArgument("topany dynamic pruning needs its trained heads",
                                  hint="train them with moeprune.methods.topany.train_topany")

    @property
    def active(self) -> bool:
        return self.method == "topany" and bool(self.heads) or self.threshold > 0 or self.low_active

    @property
    def low_active(self) -> bool:
        """Whether the least important tokens skip their experts (odp with ``drop_low`` and a fraction)."""
        return self.method == "odp" and self.drop_low > 0 and self.fraction > 0

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method, "threshold": self.threshold, "fraction": self.fraction,
             "protect": self.protect, "drop_low": self.drop_low, "renormalize": self.renormalize,
             "calibration": self.calibration}
        if self.heads:
            d["heads"] = {str(layer): {k: v.tolist() for k, v in state.items()} for layer, state in self.heads.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DynamicPrune":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InvalidArgument(
                f"dynamic_prune section has unknown fields {sorted(unknown)}: written by a newer moeprune?")
        d = dict(d)
        if d.get("heads"):
            d["heads"] = {int(layer): {k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()}
                          for layer, state in d["heads"].items()}
        return cls(**d)


def head_input(x: torch.Tensor, w: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A top-any head's input: the token's MoE input and its routed weights, largest first."""
    sorted_w = w.detach().float().masked_fill(~valid, 0).sort(-1, descending=True).values
    return torch.cat([x.detach().float(), sorted_w], -1)


def build_heads(states: dict[int, dict[str, torch.Tensor]], model: Any) -> dict[int, torch.nn.Module]:
    """Top-any heads (:mod:`moeprune.methods.topany`) as modules on the model's device."""
    device = next(model.parameters()).device
    heads = {}
    for layer, state in states.items():
        k, inputs = state["weight"].shape
        head = torch.nn.Linear(inputs, k)
        head.load_state_dict({n: t.float() for n, t in state.items()})
        heads[int(layer)] = head.to(device).eval()
    return heads


def _split_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
    return vals[0], vals[1], vals[2]


def _join_args(args: tuple, kwargs: dict, idx: torch.Tensor, w: torch.Tensor) -> tuple[tuple, dict]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    args, kwargs = list(args), dict(kwargs)
    for pos, (name, value) in enumerate(zip(names[1:], (idx, w)), start=1):
        if pos < len(args):
            args[pos] = value
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def weight_ranks(w: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rank of each routed pair among its token's pairs by weight (0 = the largest); invalid pairs last."""
    key = w.float().masked_fill(~valid, -math.inf)
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    return torch.argsort(order, dim=-1)


def reweight(w: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """Weights with dropped pairs zeroed (differentiable in ``keep`` when it is a float mask); with
    ``renormalize`` each token's kept weights are scaled back to the sum of its routed weights."""
    wf = w.float() * valid
    kept = wf * keep
    if renormalize:
        total, now = wf.sum(-1, keepdim=True), kept.sum(-1, keepdim=True)
        kept = kept * torch.where(now > 0, total / now.clamp_min(1e-30), torch.ones_like(now))
    return kept.to(w.dtype)


class DynamicPruner:
    """Hooks applying a :class:`DynamicPrune` to every MoE block of a transformers model.

    Counts ``routed`` and ``dropped`` pairs; with ``record=True`` also keeps the weight ratios of the
    pairs the rule may drop (what :func:`calibrate` cuts). Use as a context manager or
    :meth:`attach` / :meth:`remove`.
    """

    def __init__(self, model: Any, spec: DynamicPrune, record: bool = False):
        self.model, self.spec, self.record = model, spec, record
        self.adapter = get_adapter(model.config)
        self.blocks = moe_blocks(model, self.adapter)
        self.routed = self.dropped = 0
        self.forced = 0  # pairs dropped whatever the threshold (odp's drop_low tokens)
        self.ratios: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self._attention: dict[int, torch.Tensor | None] = {}
        self._saved_impl: dict[str, Any] = {}
        self.heads: dict[int, torch.nn.Module] = {}
        if spec.method == "topany" and spec.heads:
            self.heads = build_heads(spec.heads, model)
        self.train_mask = None  # topany training: layer -> callable(x, w, valid, ranks) -> float mask

    @property
    def fraction(self) -> float:
        """Share of routed pairs dropped so far."""
        return self.dropped / self.routed if self.routed else 0.0

    def __enter__(self) -> "DynamicPruner":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def attach(self) -> "DynamicPruner":
        ranks_tokens = self.spec.protect > 0 or self.spec.drop_low > 0
        protects = self.spec.method == "odp" and ranks_tokens and (self.spec.active or self.record)
        if protects and getattr(self.model.config, "_attn_implementation", None) != "eager":
            self._saved_impl["attn"] = self.model.config._attn_implementation
            self.model.set_attn_implementation("eager")
        # dropped pairs then cost nothing in moeprune's kernels; calibration passes (record) run them too:
        # transformers' CPU grouped_mm path gave non-deterministic outputs with sentinel ids here
        if self.spec.active:
            from moeprune.kernels import register

            current = self.model.config._experts_implementation
            if current != "moeprune":
                self._saved_impl["experts"] = current
                self.model.set_experts_implementation(register())
        layers = self.model.model.layers
        for layer, block in self.blocks.items():
            if protects:
                attn = getattr(layers[layer], "self_attn", None)
                if attn is not None:
                    self._handles.append(attn.register_forward_hook(self._attention_hook(layer)))
            self._handles.append(block.experts.register_forward_pre_hook(
                self._experts_hook(layer), prepend=True, with_kwargs=True))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if "attn" in self._saved_impl:
            self.model.set_attn_implementation(self._saved_impl.pop("attn"))
        if "experts" in self._saved_impl:
            self.model.set_experts_implementation(self._saved_impl.pop("experts"))

    def _attention_hook(self, layer: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            received = None
            if isinstance(weights, torch.Tensor) and weights.dim() == 4 and weights.shape[-1] == weights.shape[-2]:
                t = weights.shape[-1]
                seen_by = torch.arange(t, 0, -1, device=weights.device, dtype=torch.float32)  # queries t..T-1
                received = weights.detach().float().mean(1).sum(1) / seen_by  # [B, T]
            self._attention[layer] = received
        return hook

    def _important(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Tokens keeping every routed expert and tokens skipping every one (odp), each a mask or None."""
        received = self._attention.pop(layer, None)
        t_all = x.shape[0]
        if received is not None and received.numel() == t_all:
            b, t = received.shape
            imp = received.reshape(-1) * x.detach().float().abs().sum(-1)
        else:  # no attention probabilities (a linear-attention layer): the input norm alone
            b, t = 1, t_all
            imp = x.detach().float().abs().sum(-1)
        if t <= 1:
            return None, None
        masks = []
        for share, largest in ((self.spec.protect, True), (self.spec.drop_low if self.spec.low_active else 0, False)):
            n = int(share * t)
            if n == 0:
                masks.append(None)
                continue
            pick = imp.view(b, t).topk(n, dim=-1, largest=largest).indices
            mask = torch.zeros(b, t, dtype=torch.bool, device=x.device)
            mask.scatter_(1, pick, True)
            masks.append(mask.reshape(-1))
        return masks[0], masks[1]

    def _experts_hook(self, layer: int):
        spec = self.spec

        def hook(module, args, kwargs):
            x, idx, w = _split_args(args, kwargs)
            num = module.num_experts
            valid = (idx >= 0) & (idx < num)
            ranks = weight_ranks(w, valid)
            if self.train_mask is not None:  # topany training: a differentiable mask, every pair computed
                mask = self.train_mask(layer, x, w, valid, ranks)
                return _join_args(args, kwargs, idx, reweight(w, valid, mask, spec.renormalize))
            if spec.method == "topany":
                keep = self._topany_keep(layer, x, w, valid, ranks)
            else:
                keep = self._ratio_keep(layer, x, w, valid, ranks)
            keep = keep | ~valid
            drop = ~keep
            self.routed += int(valid.sum())
            n_drop = int(drop.sum())
            self.dropped += n_drop
            if n_drop == 0:
                return None  # untouched: bit for bit the model's own computation
            new_idx = idx.masked_fill(drop, num)
            return _join_args(args, kwargs, new_idx, reweight(w, valid, keep, spec.renormalize).masked_fill(drop, 0))
        return hook

    def _ratio_keep(self, layer: int, x, w, valid, ranks) -> torch.Tensor:
        wf = w.float()
        top = wf.masked_fill(~valid, -math.inf).amax(-1, keepdim=True).clamp_min(1e-30)
        ratio = wf / top
        eligible = valid & (ranks > 0)
        protected = low = None
        if self.spec.method == "odp" and (self.spec.protect > 0 or self.spec.low_active):
            protected, low = self._important(layer, x)
        if protected is not None:
            eligible = eligible & ~protected[:, None]
        forced = None
        if low is not None:  # MC-MoE's code: the least important tokens skip the block's experts
            forced = valid & low[:, None]
            if protected is not None:
                forced = forced & ~protected[:, None]
            eligible = eligible & ~forced
            self.forced += int(forced.sum())
        if self.record:
            self.ratios.append(ratio[eligible].detach().cpu())
        drop = eligible & (ratio < self.spec.threshold)
        return ~(drop | forced) if forced is not None else ~drop

    def _topany_keep(self, layer: int, x, w, valid, ranks) -> torch.Tensor:
        head = self.heads.get(layer)
        if head is None:
            return torch.ones_like(valid)
        with torch.no_grad():
            logits = head(head_input(x, w, valid))
            k = logits.shape[-1]
            logits = logits - self.spec.threshold * torch.arange(k, device=logits.device, dtype=logits.dtype)
            n = logits.argmax(-1, keepdim=True) + 1  # experts this token runs
        if self.record:
            self.ratios.append(logits.detach().cpu())
        return ranks < n


@contextmanager
def count_pairs(model: Any) -> Iterator[dict[str, int]]:
    """Count, over every experts call, the routed pairs and the pairs handed to the experts for
    computing (ids inside ``[0, E)``, after any dynamic pruning). Yields ``{"routed", "computed"}``."""
    counts = {"routed": 0, "computed": 0}
    try:
        blocks = moe_blocks(model, get_adapter(model.config))
    except (ValueError, LookupError):  # not a MoE model: nothing to count
        blocks = {}

    def hook(module, args, kwargs):
        _, idx, _ = _split_args(args, kwargs)
        counts["routed"] += idx.numel()
        counts["computed"] += int(((idx >= 0) & (idx < module.num_experts)).sum())

    handles = [b.experts.register_forward_pre_hook(hook, with_kwargs=True) for b in blocks.values()]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def run_texts(model: Any, encoded: Sequence[Sequence[int]], progress: bool = False, desc: str = "calibrating") -> None:
    device = next(model.parameters()).device
    for ids in tqdm(encoded, desc=desc, unit="text", disable=not progress):
        model(torch.tensor([list(ids)], device=device), use_cache=False)


def calibrate(model: Any, encoded: Sequence[Sequence[int]], fraction: float, method: str = "odp",
              protect: float = 0.1, renormalize: bool = False, heads: dict | None = None, drop_low: float = 0.0,
              iterations: int = 6, tolerance: float = 0.002, progress: bool = False,
              pruner_class: type[DynamicPruner] | None = None) -> DynamicPrune:
    """The threshold of ``method`` at which a share ``fraction`` of the routed pairs is dropped on
    ``encoded`` (token-id lists), as a :class:`DynamicPrune`.

    The ratio rules (odp, naive) cut the recorded weight ratios at the needed quantile, then repeat
    on the pass pruned with that cut (dropping at one layer moves the next layers' routing) until the
    share is within ``tolerance`` (at most ``iterations`` passes); topany bisects its bias.
    ``pruner_class``: a :class:`DynamicPruner` subclass to calibrate through (a variant's hooks).
    """
    odp = method == "odp"
    spec = DynamicPrune(method, 0.0, fraction, protect if odp else 0.0, drop_low if odp else 0.0, renormalize,
                        heads=heads)
    tokens = sum(len(ids) for ids in encoded)
    if fraction == 0:
        spec.calibration = {"tokens": tokens, "texts": len(encoded), "achieved": 0.0}
        return spec
    if method == "topany":
        raise InvalidArgument("topany learns its heads first",
                              hint="use moeprune.methods.topany.train_topany (it calibrates them)")
    best: tuple[float, float, float] | None = None  # (error, threshold, achieved)
    threshold = 0.0
    for _ in tqdm(range(iterations), desc="calibrating", unit="pass", disable=not progress):
        pruner = (pruner_class or DynamicPruner)(model, dataclasses.replace(spec, threshold=threshold), record=True)
        with pruner:
            run_texts(model, encoded)
        achieved = pruner.fraction
        if threshold > 0 and (best is None or abs(achieved - fraction) < best[0]):
            best = (abs(achieved - fraction), threshold, achieved)
        if best is not None and best[0] <= tolerance:
            break
        ratios = torch.sort(torch.cat(pruner.ratios)).values if pruner.ratios else torch.zeros(0)
        need = int(round(fraction * pruner.routed)) - pruner.forced
        if need < 0:
            raise InvalidArgument(f"dynamic_prune={fraction}: the {drop_low:.0%} least important tokens skipping "
                                  f"their experts already drop {pruner.forced / max(pruner.routed, 1):.1%} of the "
                                  "routed expert calls", hint="ask for more or lower drop_low")
        if need > ratios.numel():
            raise InvalidArgument(f"dynamic_prune={fraction}: only {ratios.numel() / max(pruner.routed, 1):.1%} of "
                                  f"the routed expert calls may be dropped by {method} (each token keeps its top "
                                  "expert" + (f", the {protect:.0%} most important tokens keep all"
                                              if method == "odp" else "") + ")", hint="ask for less")
        if ratios.numel() == 0:  # nothing the ratio rule may drop: the forced drops are all there is
            threshold = 1e-30
            continue
        hi = float(ratios[need]) if need < ratios.numel() else float(ratios[-1]) * (1 + 1e-6) + 1e-12
        threshold = (float(ratios[need - 1]) + hi) / 2 if need > 0 else float(ratios[0]) / 2
    assert best is not None
    spec.threshold = best[1]
    spec.calibration = {"tokens": tokens, "texts": len(encoded), "achieved": best[2]}
    return spec


def attach(model: Any, spec: DynamicPrune | dict[str, Any] | None) -> DynamicPruner | None:
    """Apply ``spec`` to ``model`` until ``model._moeprune_dynamic.remove()`` (None: nothing to do)."""
    if spec is None:
        return None
    if isinstance(spec, dict):
        spec = DynamicPrune.from_dict(spec)
    old = getattr(model, "_moeprune_dynamic", None)
    if old is not None:
        old.remove()
    pruner = DynamicPruner(model, spec).attach()
    model._moeprune_dynamic = pruner
    return pruner
