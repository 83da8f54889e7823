"""Expert patterns: which experts a task keeps, per MoE layer, for one model.

On disk a pattern is a small JSON document::

    {"format": "moeprune.pattern", "version": 1, "fingerprint": {...}, "task": "math",
     "method": "tcess", "layers": {"3": "<base64 bitset>", ...}, "routing": {...},
     "signature": [...], "bits": {...}, "meta": {...}, "checksum": "<sha256 of the rest>"}

Version 2 adds ``"merges": {"3": {"5": [2, 5, 9]}, ...}``: per layer, a kept expert that takes the
average of its cluster's weights and router rows (see :mod:`moeprune.methods.merge`). Patterns without
merges are still written as version 1, so older readers keep reading them; a version-1 reader
refuses a merged pattern instead of silently ignoring the merges.

Version 3 adds what HC-SMoE and router re-calibration need: ``"merge_weights"`` (per layer, kept
expert -> one weight per cluster member, in member order: a weighted average instead of the plain
mean), ``"merge_router"`` (``average``: router rows averaged like the weights; ``dominant``: the kept
expert keeps its own rows; ``fitted``: rows from the router sidecar) and ``"router_sha256"``: the
pattern carries new router tensors (its kept rows, per checkpoint key) in a safetensors sidecar
``<name>.router.safetensors`` next to the JSON, which export and the selective loader write in place
of the checkpoint's. Patterns without these are still written as version 1 or 2.

Version 4 adds ``"merge_align": "neurons"``: merged members' intermediate neurons are permuted onto the
kept expert's before the average (:mod:`moeprune.methods.merge`); patterns without it keep their version.

Bit e of a layer's bitset (little-endian within each byte) is set iff expert e is kept.
Loading validates everything: format and version, checksum, layers and expert counts against
the fingerprint, and that each layer keeps at least the router's top-k experts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from moeprune.errors import InvalidFile
from moeprune.fingerprint import Fingerprint
from moeprune.io.atomic import write_text_atomic

PATTERN_FORMAT = "moeprune.pattern"
UNGROUPED = {"n_group": 1, "topk_group": 1}  # the only routing override moeprune writes (see select.group_routing)
PATTERN_VERSION = 4
MERGE_ROUTER_MODES = ("average", "dominant", "fitted")
MERGE_ALIGN_MODES = ("none", "neurons")  # merged members' neurons: as stored, or permuted onto the kept expert's


class PatternError(InvalidFile):
    """A pattern is corrupt, malformed or made for another model."""


def encode_bitset(kept: Sequence[int], num_experts: int) -> str:
    bits = np.zeros(num_experts, dtype=bool)
    bits[list(kept)] = True
    return base64.b64encode(np.packbits(bits, bitorder="little").tobytes()).decode()


def decode_bitset(data: str, num_experts: int) -> list[int]:
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as exc:
        raise PatternError(f"bitset {data!r} is not valid base64") from exc
    if len(raw) != (num_experts + 7) // 8:
        raise PatternError(f"bitset has {len(raw)} bytes, expected {(num_experts + 7) // 8} for {num_experts} experts")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    if bits[num_experts:].any():
        raise PatternError(f"bitset sets experts beyond the layer's {num_experts}")
    return np.flatnonzero(bits[:num_experts]).tolist()


@dataclass
class ExpertPattern:
    """Kept experts per MoE layer (original expert ids, sorted) for one model and task."""

    fingerprint: Fingerprint
    kept: dict[int, list[int]]  # decoder-layer index -> kept expert ids
    task: str = ""
    method: str = ""
    routing: dict[str, Any] = field(default_factory=dict)  # config overrides, e.g. {"n_group": 1}
    signature: list[float] | None = None
    bits: dict[int, list[int]] | None = None  # per layer, bit width of each kept expert
    meta: dict[str, Any] = field(default_factory=dict)
    merges: dict[int, dict[int, list[int]]] | None = None  # per layer, kept expert -> cluster it averages
    merge_weights: dict[int, dict[int, list[float]]] | None = None  # per layer, kept expert -> member weights
    merge_router: str = "average"  # router rows of a merged expert: average | dominant | fitted
    merge_align: str = "none"  # members' neurons permuted onto the kept expert's before averaging: none | neurons
    router_overrides: dict[str, Any] | None = None  # checkpoint key -> new kept-rows tensor (sidecar file)

    def __post_init__(self) -> None:
        self.kept = {int(k): sorted(int(e) for e in v) for k, v in self.kept.items()}
        if self.merges is not None:
            self.merges = {int(layer): {int(e): sorted(int(m) for m in members) for e, members in clusters.items()}
                           for layer, clusters in self.merges.items() if clusters} or None
        if self.merge_weights is not None:
            self.merge_weights = {int(layer): {int(e): [float(w) for w in ws] for e, ws in c.items()}
                                  for layer, c in self.merge_weights.items() if c} or None
        self.validate()

    def validate(self) -> None:
        fp = self.fingerprint
        if set(self.kept) != set(fp.moe_layers):
            raise PatternError(f"pattern covers layers {sorted(self.kept)} but the model's MoE layers are "
                               f"{list(fp.moe_layers)}")
        for layer, n in zip(fp.moe_layers, fp.num_experts):
            kept = self.kept[layer]
            if len(set(kept)) != len(kept) or (kept and (kept[0] < 0 or kept[-1] >= n)):
                raise PatternError(f"layer {layer}: kept experts {kept} are not distinct ids in [0, {n})")
            if len(kept) < fp.top_k:
                raise PatternError(f"layer {layer} keeps {len(kept)} experts, fewer than the router's top-k "
                                   f"({fp.top_k}); every layer must keep at least top-k experts")
        for layer, clusters in (self.merges or {}).items():
            if layer not in self.kept:
                raise PatternError(f"merges name layer {layer}, which is not a MoE layer of the model")
            seen: set[int] = set()
            n = dict(zip(fp.moe_layers, fp.num_experts))[layer]
            for e, members in clusters.items():
                if e not in self.kept[layer] or e not in members:
                    raise PatternError(
                        f"layer {layer}: merge target {e} must be a kept expert inside its cluster {members}")
                if seen & set(members) or any(m < 0 or m >= n for m in members):
                    raise PatternError(f"layer {layer}: merge clusters must be disjoint expert ids in [0, {n})")
                seen |= set(members)
        if self.merge_align not in MERGE_ALIGN_MODES:
            raise PatternError(f"merge_align {self.merge_align!r} is not one of {', '.join(MERGE_ALIGN_MODES)}")
        if self.merge_router not in MERGE_ROUTER_MODES:
            raise PatternError(f"merge_router {self.merge_router!r} is not one of {', '.join(MERGE_ROUTER_MODES)}")
        for layer, weights in (self.merge_weights or {}).items():
            for e, ws in weights.items():
                members = (self.merges or {}).get(layer, {}).get(e)
                if members is None or len(ws) != len(members) or not all(math.isfinite(w) and w >= 0 for w in ws) \
                        or sum(ws) <= 0:
                    raise PatternError(f"layer {layer}: merge weights {ws} of expert {e} must be one non-negative "
                                       f"weight per member of its cluster {members}, not all zero")
        if self.routing and not (fp.groups[0] > 1 and self.routing == UNGROUPED):
            raise PatternError(f"routing overrides {self.routing} are not ones moeprune writes: only {UNGROUPED} "
                               f"(ungrouped routing), and only for a model with group-limited routing (this one has "
                               f"{fp.groups[0]} group(s))", hint="regenerate the pattern with `moeprune select`")
        if self.signature is not None:
            need = len(fp.moe_layers) * max(fp.num_experts)
            sig = self.signature
            if (not isinstance(sig, (list, tuple)) or len(sig) != need
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                               for x in sig)):
                raise PatternError(f"the retrieval signature must be {need} finite numbers (one per MoE layer and "
                                   f"expert), not {_brief(sig)}", hint="regenerate the pattern with `moeprune select`")
        if self.bits is not None:
            for layer, widths in self.bits.items():
                if len(widths) != len(self.kept.get(int(layer), [])):
                    raise PatternError(f"layer {layer}: {len(widths)} bit widths for {len(self.kept[layer])} experts")

    # --- views -------------------------------------------------------------------------
    @property
    def counts(self) -> dict[int, int]:
        return {layer: len(v) for layer, v in self.kept.items()}

    @property
    def is_uniform(self) -> bool:
        return len(set(self.counts.values())) == 1

    def kept_fraction(self) -> float:
        return sum(self.counts.values()) / sum(self.fingerprint.num_experts)

    def mask(self) -> np.ndarray:
        """Boolean ``[L, E]`` keep mask, rows in MoE-layer order."""
        m = np.zeros((len(self.kept), max(self.fingerprint.num_experts)), dtype=bool)
        for row, layer in enumerate(self.fingerprint.moe_layers):
            m[row, self.kept[layer]] = True
        return m

    def expert_map(self) -> dict[int, list[int]]:
        """Per layer, original expert id -> new id (-1 for pruned)."""
        out = {}
        for layer, n in zip(self.fingerprint.moe_layers, self.fingerprint.num_experts):
            new = [-1] * n
            for i, e in enumerate(self.kept[layer]):
                new[e] = i
            out[layer] = new
        return out

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        E = dict(zip(self.fingerprint.moe_layers, self.fingerprint.num_experts))
        body: dict[str, Any] = {
            "format": PATTERN_FORMAT,
            "version": PATTERN_VERSION,
            "fingerprint": self.fingerprint.to_dict(),
            "task": self.task,
            "method": self.method,
            "layers": {str(layer): encode_bitset(kept, E[layer]) for layer, kept in sorted(self.kept.items())},
            "routing": self.routing,
            "signature": self.signature,
            "bits": None if self.bits is None else {str(k): list(v) for k, v in sorted(self.bits.items())},
            "meta": self.meta,
        }
        if self.merges:
            body["version"] = 2
            body["merges"] = {str(layer): {str(e): m for e, m in sorted(c.items())}
                              for layer, c in sorted(self.merges.items())}
        else:
            body["version"] = 1
        if self.merge_weights or self.merge_router != "average" or self.router_overrides:
            body["version"] = 3
            body["merge_router"] = self.merge_router
            body["merge_weights"] = None if not self.merge_weights else {
                str(layer): {str(e): w for e, w in sorted(c.items())}
                for layer, c in sorted(self.merge_weights.items())}
            body["router_sha256"] = router_digest(self.router_overrides) if self.router_overrides else None
        if self.merges and self.merge_align != "none":
            body["version"] = 4
            body["merge_align"] = self.merge_align
        body["checksum"] = _checksum(body)
        return body

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "pattern") -> ExpertPattern:
        if not isinstance(d, Mapping) or d.get("format") != PATTERN_FORMAT:
            raise PatternError(f"{source} is not a moeprune pattern (missing format {PATTERN_FORMAT!r})")
        if not isinstance(d.get("version"), int) or d["version"] > PATTERN_VERSION:
            raise PatternError(f"{source} has pattern version {d.get('version')!r}; this moeprune reads "
                               f"up to {PATTERN_VERSION}: upgrade moeprune")
        body = {k: v for k, v in d.items() if k != "checksum"}
        if d.get("checksum") != _checksum(body):
            raise PatternError(f"{source} is corrupt: its checksum does not match its content; "
                               "regenerate it with `moeprune select`")
        try:
            fp = Fingerprint.from_dict(d["fingerprint"])
            E = dict(zip(fp.moe_layers, fp.num_experts))
            layers = {int(k): v for k, v in d["layers"].items()}
            unknown = set(layers) - set(E)
            if unknown:
                raise PatternError(f"{source} names layers {sorted(unknown)} that are not MoE layers of its model")
            kept = {layer: decode_bitset(bits, E[layer]) for layer, bits in layers.items()}
            bits = d.get("bits")
            return cls(
                fingerprint=fp, kept=kept, task=str(d.get("task", "")), method=str(d.get("method", "")),
                routing=dict(d.get("routing") or {}), signature=d.get("signature"),
                bits=None if bits is None else {int(k): [int(b) for b in v] for k, v in bits.items()},
                meta=dict(d.get("meta") or {}),
                merges=d.get("merges"), merge_weights=d.get("merge_weights"),
                merge_router=str(d.get("merge_router") or "average"),
                merge_align=str(d.get("merge_align") or "none"),
            )
        except PatternError as exc:
            raise PatternError(f"{source}: {exc.message}", hint=exc.hint) from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PatternError(f"{source} is malformed ({type(exc).__name__}: {exc})") from exc

    def save(self, path: str | Path) -> Path:
        """Write the JSON (and, when the pattern carries router tensors, its sidecar first)."""
        if self.router_overrides:
            from safetensors.torch import save_file

            from moeprune.io.atomic import atomic_path

            with atomic_path(router_sidecar(path)) as tmp:
                save_file({k: v.contiguous() for k, v in sorted(self.router_overrides.items())}, str(tmp))
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ExpertPattern:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PatternError(f"pattern file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PatternError(f"{path} is corrupt: not valid JSON ({exc})") from exc
        pattern = cls.from_dict(d, source=str(path))
        if d.get("router_sha256"):
            sidecar = router_sidecar(path)
            try:
                from safetensors.torch import load_file

                pattern.router_overrides = load_file(str(sidecar))
            except FileNotFoundError:
                raise PatternError(f"{path} carries re-fitted router rows in {sidecar.name}, which is missing: "
                                   "copy it next to the pattern, or regenerate the pattern") from None
            except Exception as exc:
                raise PatternError(f"{sidecar} is not a readable router sidecar ({exc})") from exc
            if router_digest(pattern.router_overrides) != d["router_sha256"]:
                raise PatternError(f"{sidecar} does not match {path} (its checksum differs)",
                                   hint="regenerate the pattern")
        return pattern


def router_sidecar(path: str | Path) -> Path:
    """The safetensors file holding a pattern's router tensors: ``<name>.router.safetensors``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.router.safetensors")


def router_digest(tensors: Mapping[str, Any]) -> str:
    """sha256 over the router tensors' names, dtypes, shapes and bytes."""
    import torch

    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _brief(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"{len(value)} values"
    return f"a {type(value).__name__}"


def _checksum(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]
