"""Router profiles: streaming per-(layer, expert) statistics over demo tokens.

A :class:`RouterProfile` holds sums over tokens, so profiles of two demo sets add up to the
profile of their union, and memory is O(layers x experts^2) whatever the demo length.

Signals per MoE layer l and expert e (t runs over demo tokens, z are raw router logits,
g the routing weights the model actually used, k its top-k):

- ``count[l,e]``      tokens routed to e (e in the top-k);
- ``soft[l,e]``       sum of g_{t,e};
- ``top1_count[l,e]`` tokens whose arg-max logit is e;
- ``top1_logit[l,e]`` sum of z_{t,e} over those tokens (TCESS numerator);
- ``out_aware[l,e]``  sum of g_{t,e} * ||E_e(x_t)|| * max(0, 1 - cos(h_t, h_t + r_t)), h_t the
  residual stream entering the MoE block, r_t the routed-experts output (EASY-EP);
- ``ean[l,e]``        sum of ||E_e(x_t)||_2 over tokens routed to e (REAP's EAN baseline);
- ``reap[l,e]``       sum of g_{t,e} * ||E_e(x_t)||_2 over tokens routed to e (REAP = reap / count);
- ``max_act[l,e]``    the largest |activation| of E_e's output over routed tokens (super experts);
  it combines by max, not sum, so profiles still merge;
- ``coact[l,e,f]``    tokens routing to both e and f (diagonal = count).

E_e(x) is the expert's output before gating; g the weight the experts module is called with, i.e.
what the family's router emits (renormalised over the top-k where the family does).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from moeprune.arch import MoEAdapter, get_adapter, moe_blocks
from moeprune.errors import IncompatibleError, InvalidFile
from moeprune.fingerprint import Fingerprint
from moeprune.io.atomic import atomic_path

PROFILE_FORMAT = "moeprune.profile"
PROFILE_VERSION = 1
LAYER_SIGNALS = ("count", "soft", "top1_count", "top1_logit", "out_aware", "ean", "reap", "max_act")
PAIR_SIGNALS = ("coact",)
MAX_SIGNALS = ("max_act",)  # combined by max when profiles add
# signals profiles written before them lack; a scorer that needs one names it (profile again)
OPTIONAL_SIGNALS = ("ean", "reap", "max_act")


@dataclass
class RouterProfile:
    """Per-(MoE layer, expert) sums over ``tokens`` demo tokens of one model."""

    fingerprint: Fingerprint
    stats: dict[str, torch.Tensor]  # float64: [L, E] signals and [L, E, E] coact
    tokens: int = 0
    task: str = ""
    demo_hash: str = ""
    num_demos: int = 0
    model: str = ""  # where the model was loaded from (folder or Hub id), informational

    @classmethod
    def empty(cls, fingerprint: Fingerprint, task: str = "") -> "RouterProfile":
        L, E = len(fingerprint.moe_layers), max(fingerprint.num_experts)
        stats = {name: torch.zeros(L, E, dtype=torch.float64) for name in LAYER_SIGNALS}
        stats["coact"] = torch.zeros(L, E, E, dtype=torch.float64)
        return cls(fingerprint=fingerprint, stats=stats, task=task)

    def signal(self, name: str, method: str) -> torch.Tensor:
        """Signal ``name``, or an error naming ``method`` when this profile predates it."""
        if name not in self.stats:
            raise IncompatibleError(f"{method} needs the profile signal {name!r}, which this profile (made by an "
                                    "older moeprune) lacks", hint="profile again with `moeprune profile`")
        return self.stats[name]

    @property
    def num_layers(self) -> int:
        return len(self.fingerprint.moe_layers)

    @property
    def num_experts(self) -> int:
        return max(self.fingerprint.num_experts)

    def __add__(self, other: "RouterProfile") -> "RouterProfile":
        other.fingerprint.check_compatible(self.fingerprint, what="profile")
        return RouterProfile(
            fingerprint=self.fingerprint,
            stats={k: torch.maximum(v, other.stats[k]) if k in MAX_SIGNALS else v + other.stats[k]
                   for k, v in self.stats.items() if k in other.stats},
            tokens=self.tokens + other.tokens,
            task=self.task if self.task == other.task else "+".join(t for t in (self.task, other.task) if t),
            demo_hash="+".join(h for h in (self.demo_hash, other.demo_hash) if h),
            num_demos=self.num_demos + other.num_demos,
            model=self.model or other.model,
        )

    def save(self, path: str | Path) -> Path:
        meta = {
            "format": PROFILE_FORMAT, "version": str(PROFILE_VERSION),
            "fingerprint": json.dumps(self.fingerprint.to_dict()), "task": self.task,
            "demo_hash": self.demo_hash, "tokens": str(self.tokens), "num_demos": str(self.num_demos),
            "model": self.model,
        }
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.stats.items()}, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RouterProfile":
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            stats = load_file(str(path))
        except Exception as exc:
            raise InvalidFile(f"{path} is not a readable moeprune profile ({exc})") from exc
        if meta.get("format") != PROFILE_FORMAT:
            raise InvalidFile(f"{path} is not a moeprune profile (format {meta.get('format')!r})")
        if int(meta.get("version", 0)) > PROFILE_VERSION:
            raise IncompatibleError(f"{path} has profile version {meta['version']}",
                                    hint="upgrade moeprune to read it")
        try:
            fp = Fingerprint.from_dict(json.loads(meta["fingerprint"]))
            tokens, num_demos = int(meta["tokens"]), int(meta.get("num_demos", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidFile(f"{path} is a corrupt moeprune profile (its metadata: {type(exc).__name__} {exc}); "
                              "profile again with `moeprune profile`") from None
        missing = set(LAYER_SIGNALS + PAIR_SIGNALS) - set(OPTIONAL_SIGNALS) - stats.keys()
        if missing:
            raise InvalidFile(f"{path} lacks profile signals {sorted(missing)}")
        if tokens < 0 or num_demos < 0:
            raise InvalidFile(f"{path} is a corrupt moeprune profile: {tokens} tokens, {num_demos} demos; "
                              "profile again with `moeprune profile`")
        L, E = len(fp.moe_layers), max(fp.num_experts)
        for name, t in stats.items():
            want = (L, E, E) if name in PAIR_SIGNALS else (L, E)
            if name in LAYER_SIGNALS + PAIR_SIGNALS and (tuple(t.shape) != want or not t.is_floating_point()):
                raise InvalidFile(f"{path} disagrees with its own fingerprint: signal {name!r} is {t.dtype} of shape "
                                  f"{list(t.shape)}, but {fp.describe()} needs float {list(want)}; profile again")
            if not torch.isfinite(t).all():
                raise InvalidFile(f"{path} is a corrupt moeprune profile: signal {name!r} holds NaN or infinity")
        count = stats["count"]
        if (count < 0).any() or (count > tokens).any():
            raise InvalidFile(f"{path} is a corrupt moeprune profile: its token counts per expert are not within "
                              f"[0, {tokens}] (the profile's tokens); profile again")
        # signals this moeprune no longer keeps (logit_sum: no scorer read it) are dropped
        stats = {k: v.double() for k, v in stats.items() if k in LAYER_SIGNALS + PAIR_SIGNALS}
        return cls(fingerprint=fp, stats=stats, tokens=tokens, task=meta.get("task", ""),
                   demo_hash=meta.get("demo_hash", ""), num_demos=num_demos, model=meta.get("model", ""))


def expert_pair_outputs(experts: torch.nn.Module, x: torch.Tensor, top_k_index: torch.Tensor,
                        observe: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                        ) -> torch.Tensor:
    """Un-weighted output of every (token, routed expert) pair, ``[T, k, H]``.

    Works on any transformers experts module built with ``use_experts_implementation``
    (gate/up fused or not, transposed or not, biases, the module's own gating function).
    ``observe(e, pairs, x_in, mid)`` sees each expert's pair ids, inputs and down-projection inputs.

    Without ``observe`` it runs the module's own experts implementation (grouped_mm, the moeprune
    kernels, packed quantized weights...) once over the pairs as single-expert "tokens" of weight 1,
    so profiling costs about what the plain forward costs.
    """
    T, k = top_k_index.shape
    if observe is None:
        pairs_x = x.repeat_interleave(k, dim=0)  # pair p = t * k + j reads token t
        ones = torch.ones((T * k, 1), dtype=x.dtype, device=x.device)
        return type(experts).forward(experts, pairs_x, top_k_index.reshape(-1, 1), ones).view(T, k, -1)
    out = x.new_zeros(T * k, x.shape[-1])
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts.num_experts).tolist()
    has_gate = getattr(experts, "has_gate", True)
    transposed = getattr(experts, "is_transposed", False)
    has_bias = getattr(experts, "has_bias", False)
    up_w = experts.gate_up_proj if has_gate else experts.up_proj
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        h = x[pairs // k]
        h = h @ up_w[e] if transposed else F.linear(h, up_w[e])
        if has_bias:
            h = h + (experts.gate_up_proj_bias if has_gate else experts.up_proj_bias)[e]
        h = experts._apply_gate(h) if has_gate else experts.act_fn(h)
        if observe is not None:
            observe(e, pairs, x[pairs // k], h)
        h = h @ experts.down_proj[e] if transposed else F.linear(h, experts.down_proj[e])
        if has_bias:
            h = h + experts.down_proj_bias[e]
        out[pairs] = h.to(out.dtype)
    return out.view(T, k, -1)


# pair-indexed first
_SUM_ORDER = ("count", "soft", "out_aware", "ean", "reap", "top1_count", "top1_logit")
_PAIR_SUMS = 5  # count, then the per-pair values of _LayerState.add
assert sorted(_SUM_ORDER + MAX_SIGNALS) == sorted(LAYER_SIGNALS)
PENDING_BYTES = 16 << 20  # router logits all layers may hold before they are reduced into the totals


@dataclass
class _LayerState:
    """One MoE layer's float64 totals, and the per-token values of recent calls not yet reduced.

    Reducing many demos at once keeps the per-call work to a few ops (the per-expert sums are ~20
    small ops, which cost as much as a tiny model's experts if run per call); the pending values
    ([T, E] logits and [T, k] pairs) are bounded by ``flush_elements``, whatever the demos.
    """

    row: int
    router: torch.nn.Module
    linear: torch.nn.Module  # holds the router's logits ``weight`` (and ``bias``): the router or a submodule
    sums: torch.Tensor  # [len(_SUM_ORDER), E] float64 totals
    coact: torch.Tensor  # [E, E] float64 totals
    max_act: torch.Tensor  # [E] float64 running max of |expert output|
    flush_elements: int
    residual: torch.Tensor | None = None  # the residual stream entering the block (this call)
    logits: torch.Tensor | None = None  # the router's raw logits (this call), when the router returns them
    pending: list[tuple[torch.Tensor, ...]] = field(default_factory=list)  # (z, idx, pair values) per call
    pending_elements: int = 0

    def add(self, z: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
        """``values`` ``[T*k, 4]``: per (token, routed expert) pair g, the EASY-EP signal, ||E(x)||, g*||E(x)||."""
        self.pending.append((z, idx, values))
        self.pending_elements += z.numel()
        if self.pending_elements >= self.flush_elements:
            self.flush()

    def flush(self) -> None:
        """Reduce the pending tokens into the float64 totals."""
        if not self.pending:
            return
        z, idx, values = (torch.cat(parts) for parts in zip(*self.pending))
        self.pending, self.pending_elements = [], 0
        z, values = z.double(), values.double()  # totals add up whatever the batching
        E = z.shape[-1]
        flat = idx.reshape(-1)
        top1_logit, top1 = z.max(-1)
        P = _PAIR_SUMS
        sums = torch.zeros(len(_SUM_ORDER), E, dtype=torch.float64, device=z.device)
        sums[:P].index_add_(1, flat, torch.cat((torch.ones_like(values[:, :1]), values), dim=1).T)
        sums[P:P + 2].index_add_(1, top1, torch.stack((torch.ones_like(top1_logit), top1_logit)))
        self.sums[:, :E] += sums.cpu()
        k = idx.shape[-1]  # co-selected pairs (e, f) of each token, e == f included: the diagonal is count
        pairs = (idx.unsqueeze(-1) * E + idx.unsqueeze(-2)).reshape(-1) if k > 1 else flat * (E + 1)
        self.coact[:E, :E] += torch.bincount(pairs, minlength=E * E).view(E, E).cpu()


class RouterProfiler:
    """Hooks on a transformers MoE model that stream router statistics into a profile.

    Per forward call only the hidden-size reductions run (output norms, residual drift; the router's
    logits are taken from its output); the per-expert sums are reduced in batches of many demos
    (all layers together hold at most ``PENDING_BYTES`` of logits) and land in :attr:`profile`
    when :meth:`attached` exits.
    """

    def __init__(self, model: Any, fingerprint: Fingerprint, task: str = ""):
        self.model = model
        self.adapter: MoEAdapter = get_adapter(model.config)
        self.profile = RouterProfile.empty(fingerprint, task)
        self.blocks = moe_blocks(model, self.adapter)
        if tuple(self.blocks) != fingerprint.moe_layers:
            raise IncompatibleError(
                f"model MoE layers {tuple(self.blocks)} differ from the fingerprint's {fingerprint.moe_layers}")

    @contextmanager
    def attached(self) -> Iterator["RouterProfiler"]:
        handles, patched, states = [], [], []
        layers = self.model.model.layers
        sums = torch.zeros(len(_SUM_ORDER), *self.profile.stats["count"].shape, dtype=torch.float64)
        max_act = torch.zeros_like(self.profile.stats["max_act"])
        flush_elements = max(1 << 14, PENDING_BYTES // (4 * max(len(self.blocks), 1)))
        try:
            for row, (i, block) in enumerate(self.blocks.items()):
                state = _LayerState(row=row, router=getattr(block, self.adapter.router),
                                    linear=self.adapter.logits_layer(block), sums=sums[:, row],
                                    coact=self.profile.stats["coact"][row], max_act=max_act[row],
                                    flush_elements=flush_elements)
                states.append(state)
                norm = getattr(layers[i], self.adapter.residual_norm)
                handles.append(norm.register_forward_pre_hook(self._residual_hook(state)))
                if self.adapter.router_returns_logits:
                    handles.append(state.router.register_forward_hook(self._logits_hook(state)))
                experts = block.experts
                experts.forward = self._experts_forward(experts, state)
                patched.append(experts)
            yield self
        finally:
            for h in handles:
                h.remove()
            for experts in patched:
                del experts.forward
            for state in states:
                state.flush()
            for name, values in zip(_SUM_ORDER, sums):
                self.profile.stats[name] += values
            self.profile.stats["max_act"] = torch.maximum(self.profile.stats["max_act"], max_act)

    @staticmethod
    def _residual_hook(state: _LayerState):
        def hook(module, args):
            state.residual = args[0].detach().reshape(-1, args[0].shape[-1])
        return hook

    @staticmethod
    def _logits_hook(state: _LayerState):
        def hook(module, args, output):
            state.logits = output[0] if isinstance(output, tuple) else output
        return hook

    def _experts_forward(self, experts: torch.nn.Module, state: _LayerState):
        def forward(hidden_states, top_k_index, top_k_weights):
            pair_out = expert_pair_outputs(experts, hidden_states, top_k_index)  # [T, k, H]
            routed = (pair_out * top_k_weights.to(pair_out.dtype).unsqueeze(-1)).sum(1)
            with torch.no_grad():
                self._observe(state, hidden_states, top_k_index, top_k_weights, pair_out, routed)
            return routed.to(hidden_states.dtype)

        return forward

    @staticmethod
    def _observe(state: _LayerState, x, idx, weights, pair_out, routed) -> None:
        """The hidden-size reductions of one call, in float32: raw router logits (the router's own
        when it returned them), per pair g, ||E(x)||, g * ||E(x)|| and the EASY-EP signal
        g * ||E(x)|| * max(0, 1 - cos(h, h + r)), and each expert's largest |output|."""
        z, state.logits = state.logits, None
        E = state.linear.weight.shape[0]
        if z is None or z.shape != (x.shape[0], E):
            bias = getattr(state.linear, "bias", None)
            z = F.linear(x.float(), state.linear.weight.float(), None if bias is None else bias.float())
        w = weights.float().reshape(-1)
        h = (state.residual if state.residual is not None else x).float()
        drift = (1 - F.cosine_similarity(h, h + routed.float(), dim=-1)).clamp_min(0)  # [T]
        norm = pair_out.norm(dim=-1, dtype=torch.float32)  # [T, k]
        signal = w * (norm * drift[:, None]).reshape(-1)
        norm = norm.reshape(-1)
        state.add(z.float(), idx, torch.stack((w, signal, norm, w * norm), dim=1))
        peak = pair_out.abs().amax(-1).reshape(-1).double().cpu()  # [T*k]
        state.max_act.scatter_reduce_(0, idx.reshape(-1).cpu(), peak, reduce="amax")


def profile_model(model: Any, encoded_demos: Sequence[Sequence[int]], fingerprint: Fingerprint,
                  task: str = "", demo_hash: str = "", progress: bool = True) -> RouterProfile:
    """Run the demos through the model (one at a time, no padding) and return their router profile."""
    profiler = RouterProfiler(model, fingerprint, task)
    device = next(model.parameters()).device
    with torch.inference_mode(), profiler.attached():
        for ids in tqdm(encoded_demos, desc="profiling", unit="demo", disable=not progress):
            model(torch.tensor([list(ids)], device=device), use_cache=False)
            profiler.profile.tokens += len(ids)
            profiler.profile.num_demos += 1
    profiler.profile.demo_hash = demo_hash
    return profiler.profile
