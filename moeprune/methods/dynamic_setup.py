"""What a user's ``dynamic_prune=`` asks for, turned into a calibrated rule (:mod:`moeprune.methods.dynamic`).

A request is one of:

- a fraction ``F``: MC-MoE's online dynamic pruning (``odp``) calibrated on the demos to skip about ``F``
  of the routed token-expert pairs;
- ``{"method": "odp" | "naive" | "topany", "fraction": F, ...}`` (no ``threshold``): that rule calibrated
  on the demos; further keys go to its calibration (:func:`~moeprune.methods.dynamic.calibrate`, or
  :func:`~moeprune.methods.topany.train_topany` for ``topany``, e.g. ``steps``);
- a calibrated rule (a :class:`~moeprune.methods.dynamic.DynamicPrune`, or its ``to_dict()``, as an export
  stores it): applied as it is;
- None: the rule stored in the checkpoint's ``moeprune`` config section, if any; False: none.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

from moeprune.demos import encode_demos, read_demos
from moeprune.errors import InvalidArgument
from moeprune.methods.dynamic import METHODS, DynamicPrune, attach, calibrate
from moeprune.methods.topany import train_topany
from moeprune.modeling import load_tokenizer, max_context


def calibration_request(dynamic_prune: Any) -> dict[str, Any] | None:
    """``{"method", "fraction", **options}`` when ``dynamic_prune`` asks for a rule to be calibrated, else None."""
    if isinstance(dynamic_prune, bool) or dynamic_prune is None or isinstance(dynamic_prune, DynamicPrune):
        return None
    if isinstance(dynamic_prune, dict):
        if "threshold" in dynamic_prune or "heads" in dynamic_prune:
            return None  # an already calibrated rule
        if "fraction" not in dynamic_prune:
            raise InvalidArgument("a dynamic_prune request needs its fraction",
                                  hint='e.g. dynamic_prune={"method": "naive", "fraction": 0.2}')
        req = dict(dynamic_prune)
        req.setdefault("method", "odp")
    else:
        req = {"method": "odp", "fraction": dynamic_prune}
    if req["method"] not in METHODS:
        raise InvalidArgument(f"dynamic pruning method {req['method']!r} is not one of {', '.join(METHODS)}")
    try:
        req["fraction"] = float(req["fraction"])
    except (TypeError, ValueError):
        raise InvalidArgument(f"dynamic_prune={req['fraction']!r} is no fraction of routed expert calls",
                              hint="give a number in [0, 1)") from None
    return req


def calibrate_rule(model: Any, encoded: Sequence[Sequence[int]], request: dict[str, Any],
                   progress: bool = False) -> DynamicPrune:
    """The rule ``request`` (:func:`calibration_request`) asks for, calibrated on ``encoded`` through ``model``."""
    options = {k: v for k, v in request.items() if k not in ("method", "fraction")}
    method, fraction = request["method"], request["fraction"]
    fit = train_topany if method == "topany" and fraction > 0 else calibrate
    allowed = set(inspect.signature(fit).parameters) - {"model", "encoded", "fraction", "method", "progress"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InvalidArgument(f"dynamic pruning method {method!r} takes no option {', '.join(unknown)}",
                              hint=f"its options: {', '.join(sorted(allowed))}")
    if fit is calibrate:
        return calibrate(model, encoded, fraction, method=method, progress=progress, **options)
    return train_topany(model, encoded, fraction, progress=progress, **options)


def resolve_dynamic(net: Any, ckpt: Any, dynamic_prune: Any, demos: str | Path | None = None,
                    max_tokens: int | None = None, progress: bool = False) -> DynamicPrune | None:
    """The :class:`~moeprune.methods.dynamic.DynamicPrune` to apply to a loaded model (None for none), from
    any request the module docstring lists; one to calibrate needs ``demos`` (a demo file)."""
    if dynamic_prune is False:
        return None
    if dynamic_prune is None:
        stored = (ckpt.config.get("moeprune") or {}).get("dynamic_prune")
        return DynamicPrune.from_dict(stored) if stored else None
    if isinstance(dynamic_prune, DynamicPrune):
        return dynamic_prune
    request = calibration_request(dynamic_prune)
    if request is None:
        return DynamicPrune.from_dict(dynamic_prune)
    if demos is None:
        raise InvalidArgument(f"dynamic pruning of {request['fraction']} calibrates its threshold on the task's "
                              "demos", hint="give them (demos=FILE)")
    encoded = encode_demos(read_demos(demos), load_tokenizer(ckpt), max_length=max_context(net),
                           max_tokens=max_tokens, vocab_size=getattr(net.config, "vocab_size", None))
    return calibrate_rule(net, encoded, request, progress=progress)


def apply_dynamic(net: Any, ckpt: Any, dynamic_prune: Any, demos: str | Path | None = None) -> Any:
    """:func:`resolve_dynamic`, attached to ``net`` (its handle; None when there is none to apply)."""
    spec = resolve_dynamic(net, ckpt, dynamic_prune, demos)
    return attach(net, spec) if spec is not None and spec.active else None
