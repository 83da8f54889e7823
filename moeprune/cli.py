"""The ``moeprune`` command line: profile, select, export, prune, inspect, store, retrieve, serve, demo.

Human-readable tables by default, one JSON document on stdout with ``--json``. Progress bars go
to stderr and are silenced by ``--quiet`` (and by ``--json``). What moeprune refuses (a
:class:`~moeprune.errors.MoePruneError`, its message in the command line's flags) and what the system
refuses (an ``OSError``) print one line and exit with status 2 (``MOEPRUNE_DEBUG=1`` adds the
traceback); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from moeprune.errors import InvalidArgument, MoePruneError

# Library messages name API parameters (``keep=0.7``, ``budget=global``, ``overwrite=True``); the
# command line shows them as its flags (``--keep 0.7``, ``--budget global``, ``--overwrite``): this
# table is the one place that knows which flag sets which parameter.
FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "keep", "budget", "min_per_layer", "method", "demos", "model", "out", "overwrite", "task", "device", "dtype",
    "max_tokens", "max_shard_size", "bits", "avg_bits", "group_size", "quant_method", "target", "unstructured",
    "nm", "dynamic_prune", "recalibrate_router", "recalibrate_steps", "protect_super_experts", "base", "seed",
    "mix", "merge", "representative", "threshold", "layers", "offload", "pattern", "steps", "lam", "rho",
    "max_subsets", "separate", "drift", "normalize_rows", "align")}
FLAGS.update({"symmetric": "--asym", "router": "--merge-router", "metric": "--hc-metric",
              "weights": "--hc-weights"})
_INVERTED = {"symmetric"}  # --asym sets symmetric=False
_PARAM = re.compile(r"(?<![\w.\-])(?P<name>" + "|".join(sorted(FLAGS, key=len, reverse=True))
                    + r")=(?P<value>(?:True|False)\b|)")


def flag_words(text: str) -> str:
    """``text`` with the API parameters it names written as this command line's flags."""
    def flag(m: re.Match) -> str:
        name, value = m["name"], m["value"]
        if value in ("True", "False"):
            return FLAGS[name] if (value == "True") != (name in _INVERTED) else f"no {FLAGS[name]}"
        return f"{FLAGS[name]} {value}"
    return _PARAM.sub(flag, text)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.4g}"
    return str(c)


def _ids(ids: Sequence[int], limit: int = 16) -> str:
    s = ",".join(map(str, ids[:limit]))
    return s + (f",…(+{len(ids) - limit})" if len(ids) > limit else "")


def _emit(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, indent=1, default=str) if args.json else human)


# --- commands ------------------------------------------------------------------------------

def cmd_profile(args: argparse.Namespace) -> None:
    from moeprune.io.atomic import check_file_target
    from moeprune.pipeline import profile_checkpoint

    check_file_target(args.out)  # before the work, not after

    prof = profile_checkpoint(args.model, args.demos, task=args.task or "", max_tokens=args.max_tokens,
                              device=args.device, dtype=args.dtype, progress=_progress(args), offload=args.offload)
    prof.save(args.out)
    used = (prof.stats["count"] > 0).sum(1).tolist()
    data = {"out": str(args.out), "task": prof.task, "tokens": prof.tokens, "demos": prof.num_demos,
            "moe_layers": list(prof.fingerprint.moe_layers), "experts_used_per_layer": used}
    _emit(args, data, f"profiled {prof.num_demos} demos ({prof.tokens} tokens) of task {prof.task!r} on "
                      f"{prof.fingerprint.describe()}\nwrote {args.out}")


def _pattern_table(pattern) -> str:
    rows = [(layer, f"{len(k)}/{n}", _ids(k)) for (layer, k), n in
            zip(sorted(pattern.kept.items()), pattern.fingerprint.num_experts)]
    notes = "".join(f"\nnote: {n}" for n in pattern.meta.get("notes", []))
    return (f"task {pattern.task!r}, method {pattern.method!r}, keeps {pattern.kept_fraction():.1%} of experts\n"
            + _table(rows, ["layer", "kept", "experts"]) + notes)


# built-in scorer parameters whose flag is not ``--<parameter>`` (method, parameter) -> flag dest
_FLAG_OF = {
    ("hc-smoe", "router"): "merge_router",
    ("uncurl", "router"): "merge_router",
    ("hc-smoe", "metric"): "hc_metric",
    ("hc-smoe", "weights"): "hc_weights",
}
# choices and help of built-in parameters' flags (any other parameter's flag: its type, default and methods)
_FLAG_DOCS: dict[str, tuple[list[str] | None, str]] = {
    "seed": (None, "seed for random, diep, uncurl"),
    "mix": (None, "stun: weight of co-activation vs router-row distance (default 0)"),
    "merge": (["representative", "average"], "stun: keep each cluster's centroid-nearest expert (default) or the "
              "average of the cluster's weights and router rows"),
    "representative": (["centroid", "most-routed"],
                       "stun: the member kept per cluster: routed most (default) or nearest the weight centroid"),
    "base": (None, "router-drift: the pre-trained model the fine-tuned MODEL came from"),
    "merge_router": (["dominant", "average", "fitted"],
                     "hc-smoe, uncurl: a merged expert's router row: its dominant member's (default), the "
                     "members' average (uncurl: weighted as its weights), or (hc-smoe) fitted to the members' "
                     "summed routing probability"),
    "hc_metric": (["euclidean", "cosine"], "hc-smoe: distance between experts' mean outputs (default euclidean)"),
    "hc_weights": (["output", "count"], "hc-smoe: what picks the experts kept apart, each cluster's kept member "
                   "and the merge weights: output-aware importance (default) or routing counts (HC-SMoE's)"),
    "align": (["neurons", "none"], "hc-smoe: permute each merged member's neurons onto the kept expert's before "
              "averaging (default neurons, M-SMoE's alignment; fused GPT-OSS experts: none)"),
}


@dataclass
class _MethodFlag:
    """One command-line flag for the scorer parameters of that name: the methods taking it, its type."""

    dest: str
    kind: Any
    params: dict[str, str] = field(default_factory=dict)  # method -> its parameter
    defaults: dict[str, Any] = field(default_factory=dict)  # method -> the parameter's default

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")


def _method_flags() -> dict[str, _MethodFlag]:
    """The flags of every registered scorer's parameters (:class:`~moeprune.methods.registry.ScorerSpec`)."""
    from moeprune.methods.registry import spec
    from moeprune.methods.scoring import SCORERS

    flags: dict[str, _MethodFlag] = {}
    for method in sorted(SCORERS):
        for param, (kind, default) in spec(method).params.items():
            dest = _FLAG_OF.get((method, param), param)
            entry = flags.setdefault(dest, _MethodFlag(dest, kind if kind is not None else type(default)))
            entry.params[method] = param
            entry.defaults[method] = default
    return flags


def _argparse_type(kind: Any) -> Any:
    """The argparse ``type`` of a parameter annotation (``bool``: a --flag/--no-flag pair; other types: str)."""
    import types
    import typing

    kinds = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    kinds = [k for k in kinds if k is not type(None)]
    for k in (str, bool, int, float):
        if k in kinds:
            return k
    return str


def _add_method_options(c: argparse.ArgumentParser) -> None:
    """A flag per scorer parameter (a parameter named like another option of the command is Python-only)."""
    for entry in _method_flags().values():
        choices, help = _FLAG_DOCS.get(entry.dest, (None, None))
        if help is None:
            values = set(map(repr, entry.defaults.values()))
            default = (values.pop() if len(values) == 1
                       else ", ".join(f"{m} {d!r}" for m, d in sorted(entry.defaults.items())))
            names = "/".join(sorted(set(entry.params.values())))
            help = f"{', '.join(sorted(entry.params))}: {names} (default {default})"
        kind = _argparse_type(entry.kind)
        options: dict[str, Any] = ({"action": argparse.BooleanOptionalAction} if kind is bool
                                   else {"type": kind, "choices": choices})
        try:
            c.add_argument(entry.flag, dest=entry.dest, default=None, help=help.replace("%", "%%"), **options)
        except argparse.ArgumentError:
            continue


def _method_params(args: argparse.Namespace) -> dict[str, Any]:
    """The chosen method's parameters given on the command line (a flag of another method's is refused)."""
    params = {}
    for entry in _method_flags().values():
        value = getattr(args, entry.dest, None)
        if value is None:
            continue
        if args.method not in entry.params:
            raise InvalidArgument(f"{entry.flag} applies to --method {', '.join(sorted(entry.params))} only")
        params[entry.params[args.method]] = value
    if getattr(args, "protect_super_experts", False):
        params["protect_super_experts"] = True
    return params


def cmd_select(args: argparse.Namespace) -> None:
    from moeprune.io.atomic import check_file_target
    from moeprune.pipeline import select_from_profiles

    check_file_target(args.out)
    pattern = select_from_profiles(args.profile, args.method, args.keep, task=args.task, budget=args.budget,
                                   min_per_layer=args.min_per_layer, model=args.model, demos=args.demos,
                                   device=args.device, dtype=args.dtype, recalibrate_router=args.recalibrate_router,
                                   recalibrate_steps=args.recalibrate_steps, progress=_progress(args),
                                   **_method_params(args))
    pattern.save(args.out)
    data = {"out": str(args.out), "task": pattern.task, "method": pattern.method,
            "kept": {str(k): v for k, v in pattern.kept.items()}, "routing": pattern.routing,
            "notes": pattern.meta.get("notes", []), "protected": pattern.meta.get("protected")}
    _emit(args, data, _pattern_table(pattern) + f"\nwrote {args.out}")


def _export_human(summary: dict[str, Any]) -> str:
    per_layer = dict(sorted(summary["kept_per_layer"].items()))
    counts = (str(next(iter(per_layer.values()))) if len(set(per_layer.values())) == 1
              else ", ".join(f"{layer}: {n}" for layer, n in per_layer.items()))
    return (f"wrote {summary['out']}: {summary['tensors']} tensors in {summary['shards']} shard(s), "
            f"{summary['bytes_written'] / 2**20:.1f} MiB (read {summary['bytes_read'] / 2**20:.1f} MiB); "
            f"experts per MoE layer: {counts}" + _group_human(summary.get("quantization"))
            + _calibration_human(summary.get("calibration"))
            + (f"\nloads in {summary['compatibility']['line']}" if summary.get("compatibility") else ""))


def _group_human(quant: dict[str, Any] | None) -> str:
    if not quant or quant["group_size"] == quant["group_size_asked"]:
        return ""
    return (f"\nexperts quantized in groups of {quant['group_size']} input columns, not {quant['group_size_asked']}: "
            f"the largest group <= {quant['group_size_asked']} dividing their input sizes "
            f"{', '.join(map(str, quant['expert_input_sizes']))}")


def _calibration_human(calib: dict[str, Any] | None) -> str:
    if not calib:
        return ""
    return (f"\nGPTQ: {calib['matrices']} expert matrices, {calib['rtn_fallback']} of them round-to-nearest "
            "(their expert got fewer demo tokens than its input size)")


def _group_size(args: argparse.Namespace) -> int:
    """``--group-size`` (default 128); it and ``--asym`` are refused without a width to quantize to."""
    from moeprune.quantization.compressed import DEFAULT_GROUP

    if args.bits is None and args.avg_bits is None:
        given = [f for f, on in (("--group-size", args.group_size is not None), ("--asym", args.asym)) if on]
        if given:
            raise InvalidArgument(f"{' and '.join(given)} only shape{'s' if len(given) == 1 else ''} quantized "
                                  "experts, and nothing here quantizes them",
                                  hint="give --bits N or --avg-bits B too, or drop " + " and ".join(given))
    return DEFAULT_GROUP if args.group_size is None else args.group_size


def cmd_export(args: argparse.Namespace) -> None:
    from moeprune.pipeline import export_pattern

    summary = export_pattern(args.model, args.pattern, args.out, profile=args.profile, bits=args.bits,
                             avg_bits=args.avg_bits, group_size=_group_size(args), symmetric=not args.asym,
                             quant_method=args.quant_method, demos=args.demos, max_tokens=args.max_tokens,
                             target=args.target, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                             progress=_progress(args))
    _emit(args, summary, _export_human(summary))


def _dynamic_request(args: argparse.Namespace) -> Any:
    """``--dynamic-prune F [--dynamic-method M]`` as the API's ``dynamic_prune`` (None when not asked);
    refused, before anything loads, without the demos it is calibrated on."""
    method = getattr(args, "dynamic_method", None)
    if args.dynamic_prune is None:
        if method is not None:
            raise InvalidArgument("--dynamic-method picks the rule of --dynamic-prune F: give F too")
        return None
    if not args.demos:
        raise InvalidArgument("--dynamic-prune F calibrates its threshold on the task's demos: give --demos FILE")
    return {"method": method or "odp", "fraction": args.dynamic_prune}


def cmd_prune(args: argparse.Namespace) -> None:
    from moeprune.pipeline import prune

    params = _method_params(args)
    pattern, summary = prune(args.model, args.demos, args.method, args.keep, args.out, task=args.task or "",
                             max_tokens=args.max_tokens, device=args.device, dtype=args.dtype,
                             overwrite=args.overwrite, progress=_progress(args),
                             max_shard_size=args.max_shard_size, budget=args.budget,
                             min_per_layer=args.min_per_layer, unstructured=args.unstructured, nm=args.nm,
                             bits=args.bits, avg_bits=args.avg_bits, group_size=_group_size(args),
                             dynamic_prune=_dynamic_request(args), symmetric=not args.asym, target=args.target,
                             recalibrate_router=args.recalibrate_router,
                             recalibrate_steps=args.recalibrate_steps, quant_method=args.quant_method, **params)
    if args.save_pattern:
        pattern.save(args.save_pattern)
    data = dict(summary, task=pattern.task, method=pattern.method,
                kept={str(k): v for k, v in pattern.kept.items()})
    _emit(args, data, _pattern_table(pattern) + "\n" + _export_human(summary))


def cmd_inspect(args: argparse.Namespace) -> None:
    from moeprune.patterns.pattern import ExpertPattern
    from moeprune.profiling.profile import RouterProfile

    path = Path(args.file)
    if path.suffix == ".json":
        pattern = ExpertPattern.load(path)
        matrix = pattern.mask().astype(float)
        data = {"kind": "pattern", "task": pattern.task, "method": pattern.method,
                "fingerprint": pattern.fingerprint.to_dict(), "kept": {str(k): v for k, v in pattern.kept.items()},
                "routing": pattern.routing, "meta": pattern.meta}
        human, title = _pattern_table(pattern), f"kept experts: {pattern.task}"
    else:
        prof = RouterProfile.load(path)
        freq = prof.stats["count"] / max(prof.tokens, 1)
        matrix = freq.numpy()
        layers = []
        for row, (layer, n) in enumerate(zip(prof.fingerprint.moe_layers, prof.fingerprint.num_experts)):
            f = freq[row, :n]  # a non-uniform model's layer holds n experts
            p = f[f > 0] / f.sum().clamp_min(1e-30)
            effective = float((-(p * p.log()).sum()).exp())  # exp(entropy) of the routing shares
            layers.append({"layer": layer, "experts_used": int((f > 0).sum()), "effective_experts": round(effective, 2),
                           "most_used": [e for e in f.argsort(descending=True).tolist() if f[e] > 0]})
        rows = [(d["layer"], d["experts_used"], d["effective_experts"], _ids(d["most_used"], 8)) for d in layers]
        data = {"kind": "profile", "task": prof.task, "tokens": prof.tokens, "demos": prof.num_demos,
                "fingerprint": prof.fingerprint.to_dict(), "frequency": freq.tolist(), "layers": layers}
        human = (f"profile of task {prof.task!r}: {prof.num_demos} demos, {prof.tokens} tokens, "
                 f"{prof.fingerprint.describe()}\n"
                 + _table(rows, ["layer", "experts used", "effective experts", "most used"]))
        title = f"expert usage (fraction of tokens): {prof.task}"
    if args.plot:
        _heatmap(matrix, list(data["fingerprint"]["moe_layers"]), title, args.plot)
        human += f"\nwrote {args.plot}"
        data["plot"] = str(args.plot)
    _emit(args, data, human)


def _heatmap(matrix, layers: list[int], title: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.25 * matrix.shape[1]), min(12, 1.5 + 0.3 * matrix.shape[0])))
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def cmd_demo(args: argparse.Namespace) -> None:
    from moeprune.showcase import run_demo

    results = run_demo(method=args.method, keep=args.keep, model=args.model, progress=_progress(args),
                       device=args.device, dtype=args.dtype)
    rows = []
    for r in results:
        first = min(r.kept)
        rows.append((r.domain, f"{len(r.kept[first])}", _ids(r.kept[first]), r.ppl_full, r.ppl_pruned, r.ratio))
    human = (f"method {args.method}, keep {args.keep} (kept experts shown for MoE layer {min(results[0].kept)})\n"
             + _table(rows, ["domain", "kept/layer", "kept experts", "ppl full", "ppl pruned", "ratio"]))
    _emit(args, [r.to_dict() for r in results], human)


def cmd_eval(args: argparse.Namespace) -> None:
    from moeprune.api import evaluate_checkpoint

    dynamic = _dynamic_request(args)
    res = evaluate_checkpoint(args.model, args.texts, pattern=args.pattern, dynamic_prune=dynamic,
                              demos=args.demos, max_tokens=args.max_tokens, device=args.device,
                              dtype=None if args.dtype == "auto" else args.dtype, progress=_progress(args))
    rows = [("perplexity", res["perplexity"]), ("tokens", res["tokens"]), ("texts", res["texts"]),
            ("active_expert_fraction", res["active_expert_fraction"])]
    dyn = res["dynamic_prune"]
    if dyn:
        rows.append(("dynamic_prune", f"{dyn['method']} F={dyn['fraction']:g} threshold={dyn['threshold']:.4g} "
                                      f"(on demos {dyn['calibration'].get('achieved', 0):.3f})"))
    _emit(args, res, _table(rows, ["metric", "value"]))


def cmd_store(args: argparse.Namespace) -> None:
    from moeprune.patterns.store import PatternStore

    store = PatternStore(args.store)
    if args.action == "add":
        _store_add(args, store)
    elif args.action == "list":
        entries = store.list()
        rows = [(t, e["method"], f"{e['kept_fraction']:.0%}", "yes" if e["signature"] else "no", e.get("model") or "-")
                for t, e in entries.items()]
        _emit(args, entries, _table(rows, ["task", "method", "kept", "signature", "model"]) if rows
              else f"store {store.root} is empty")
    elif args.action == "show":
        pattern = store.get(_need_task(args))
        _emit(args, pattern.to_dict(), _pattern_table(pattern))
    elif args.action == "remove":
        task = _need_task(args)
        store.remove(task)
        _emit(args, {"removed": task}, f"removed {task!r} from {store.root}")


def _need_task(args: argparse.Namespace) -> str:
    task = args.target or args.task
    if not task:
        raise InvalidArgument(f"`moeprune store {args.action} STORE TASK` needs a task name")
    return task


def _store_add(args: argparse.Namespace, store) -> None:
    from moeprune.store_jobs import add_to_store

    pattern, path = add_to_store(store, model=args.target, demos=args.demos, task=args.task, pattern=args.pattern,
                                 method=args.method, keep=args.keep, max_tokens=args.max_tokens, device=args.device,
                                 dtype=args.dtype, overwrite=args.overwrite,
                                 protect_super_experts=args.protect_super_experts, progress=_progress(args))
    _emit(args, {"task": pattern.task, "file": str(path), "kept_fraction": pattern.kept_fraction()},
          _pattern_table(pattern) + f"\nstored as {path}")


def _threshold(value: str) -> float | str | None:
    """``--threshold``: ``auto`` (set from the demos), a distance, or a negative number (no fallback)."""
    if value == "auto":
        return "auto"
    try:
        t = float(value)
    except ValueError:
        raise InvalidArgument(f"--threshold {value!r} is neither 'auto' nor a number") from None
    if math.isnan(t):
        raise InvalidArgument("--threshold nan is no distance: give a number, 'auto', or a negative one (no fallback)")
    return None if t < 0 else t


def cmd_retrieve(args: argparse.Namespace) -> None:
    from moeprune.store_jobs import query_text, retrieve

    threshold = _threshold(args.threshold)  # a bad threshold is refused before anything loads
    found = retrieve(args.store, args.query if args.query is not None else args.queries, model=args.model,
                     layers=args.layers, threshold=threshold, device=args.device, dtype=args.dtype)
    data = [dict(m.to_dict(), query=query_text(q)) for m, q in found]
    rows = [(i, query_text(q)[:48], m.task, m.distance) for i, (m, q) in enumerate(found)]
    _emit(args, data, _table(rows, ["#", "query", "task", "distance"]))


def cmd_serve(args: argparse.Namespace) -> None:
    import math

    from moeprune.loader.runtime import TaskAdaptiveModel
    from moeprune.serve.app import bind, create_app, run

    if (args.max_batch < 1 or args.max_tokens_cap < 1 or not (math.isfinite(args.max_wait) and args.max_wait >= 0)
            or not (math.isfinite(args.cache_gb) and args.cache_gb >= 0)
            or not (math.isfinite(args.max_body_kb) and args.max_body_kb > 0)):
        raise InvalidArgument("--max-batch and --max-tokens-cap must be >= 1, --max-wait and --cache-gb finite "
                              "and >= 0, --max-body-kb > 0")
    dynamic = _dynamic_request(args)
    threshold = _threshold(args.threshold)
    sock = bind(args.host, args.port)  # a taken port fails before the model loads
    runtime = TaskAdaptiveModel(args.model, store=args.store, device=args.device, dtype=args.dtype,
                                cache_bytes=int(args.cache_gb * 2**30), bits=args.bits,
                                threshold=threshold, max_new_tokens_limit=args.max_tokens_cap,
                                dynamic_prune=dynamic, demos=args.demos)
    app = create_app(runtime, model_id=args.model_id,
                     max_body_bytes=int(args.max_body_kb * 1024), max_batch=args.max_batch, max_wait=args.max_wait,
                     prefetch=not args.no_prefetch)
    served = app.state.served
    port = sock.getsockname()[1]
    print(f"serving {served.model_id} (tasks: {', '.join(served.tasks())}) on http://{args.host}:{port}/v1",
          file=sys.stderr, flush=True)
    run(app, sock, quiet=args.quiet)


# --- parser --------------------------------------------------------------------------------

def _progress(args: argparse.Namespace) -> bool:
    return not (args.quiet or args.json)


def build_parser() -> argparse.ArgumentParser:
    from moeprune.methods.dynamic import METHODS as DYNAMIC_METHODS
    from moeprune.methods.scoring import SCORERS  # imports torch: after main() can handle Ctrl-C
    from moeprune.methods.select import BUDGETS
    from moeprune.quantization.gptq_experts import QUANT_METHODS
    from moeprune.quantization.widths import WIDTHS

    widths = sorted(WIDTHS, reverse=True)

    methods = sorted(SCORERS)
    p = argparse.ArgumentParser(prog="moeprune", description="Task-adaptive expert pruning for MoE language models.")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
        c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        return c

    def runtime(c: argparse.ArgumentParser, dtype: str = "auto") -> None:
        c.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda, cuda:1, ...)")
        c.add_argument("--dtype", default=dtype,
                       help=f"model dtype: auto, float32, bfloat16, float16 (default {dtype})")

    def dynamic_method(c: argparse.ArgumentParser) -> None:
        c.add_argument("--dynamic-method", choices=DYNAMIC_METHODS, default=None,
                       help="(--dynamic-prune) the rule: odp (MC-MoE, default), naive (weight ratio only), topany "
                            "(MC# heads trained on the demos)")

    def demos(c: argparse.ArgumentParser) -> None:
        c.add_argument("--demos", required=True, help="demo file: JSONL (text | messages | input_ids) or plain text")
        c.add_argument("--task", help="task name (default: the demo file's name)")
        c.add_argument("--max-tokens", type=int, help="stop after this many demo tokens")

    def selection(c: argparse.ArgumentParser) -> None:
        c.add_argument("--method", default="tcess", choices=methods, help="expert scorer (default tcess)")
        c.add_argument("--keep", required=True, help="experts kept per layer: fraction (0.5) or count (32)")
        c.add_argument("--budget", choices=BUDGETS,
                       help="uniform: K per layer; global: K x layers over the model, counts per layer differ; "
                            "top-p: per layer the fewest experts covering a share --keep of its score mass "
                            "(default: the method's own; stun and diep are global)")
        c.add_argument("--min-per-layer", type=int, help="global budget: each layer keeps at least this many "
                       "(never below the router's top-k)")
        c.add_argument("--recalibrate-router", action="store_true",
                       help="fit the kept router rows (and selection biases) on the demos so the pruned model's "
                            "next tokens match the full model's (KL); the pattern carries them in a sidecar "
                            "<pattern>.router.safetensors and the export writes them (select: needs --demos)")
        c.add_argument("--recalibrate-steps", type=int, help="re-calibration steps (default 4 per demo, 50-400)")
        protect(c)

    def protect(c: argparse.ArgumentParser) -> None:
        c.add_argument("--protect-super-experts", action="store_true",
                       help="never prune super experts (REAP's rule: largest activation above max(99.5th "
                            "percentile of all experts, model's largest / 10)); any method")

    def output_dir(c: argparse.ArgumentParser) -> None:
        c.add_argument("--out", required=True, help="folder for the pruned checkpoint (must not exist)")
        c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        c.add_argument("--max-shard-size", default="2GB", help="largest output shard (default 2GB)")
        q = c.add_mutually_exclusive_group()
        q.add_argument("--bits", type=int, choices=widths, help="quantize every kept expert to this width "
                       "(a compressed-tensors pack-quantized export)")
        q.add_argument("--avg-bits", type=float, help="mixed precision per expert (2/4/8 bits) meeting this "
                       "average width, allotted by an exact integer program (MC-MoE)")
        c.add_argument("--group-size", type=int, help="quantization group along the input (default 128, or the "
                       "largest size below it dividing the experts' input sizes)")
        c.add_argument("--asym", action="store_true", help="asymmetric quantization (zero points; default symmetric)")
        c.add_argument("--target", choices=["vllm"], help="refuse up front what this engine cannot load "
                       "(vllm: uniform budget; symmetric 4 or 8 bits, one width, groups of 32, 64 or 128)")
        c.add_argument("--quant-method", choices=QUANT_METHODS, default="rtn",
                       help="rtn: round to nearest (default); gptq: GPTQ calibrated on the demos (export: --demos)")

    c = command("profile", "collect router statistics of MODEL on few-shot demos")
    c.add_argument("model", help="local checkpoint folder or Hugging Face Hub id")
    demos(c)
    c.add_argument("--out", required=True, help="profile file to write (.safetensors)")
    c.add_argument("--offload", action="store_true",
                   help="materialize one decoder layer at a time (models larger than memory); same profile")
    runtime(c)
    c.set_defaults(func=cmd_profile)

    c = command("select", "score experts from profile(s) and write a pattern")
    c.add_argument("profile", nargs="+", help="profile file(s); several are added up")
    selection(c)
    c.add_argument("--task", help="task name stored in the pattern (default: the profile's)")
    c.add_argument("--out", required=True, help="pattern file to write (.json)")
    c.add_argument("--model", help="checkpoint, for methods that read weights (default: the profiled one)")
    c.add_argument("--demos", help="demo file, for methods that run the model (diep, enumerate)")
    runtime(c, dtype="float32")  # where the model runs (with --demos); diep trains gates in it
    _add_method_options(c)
    c.set_defaults(func=cmd_select)

    c = command("export", "write MODEL's checkpoint keeping only a pattern's experts")
    c.add_argument("model", help="local checkpoint folder or Hugging Face Hub id")
    c.add_argument("--pattern", required=True, help="pattern file from `moeprune select`")
    c.add_argument("--profile", help="(--avg-bits) the profile the pattern was selected from")
    c.add_argument("--demos", help="(--quant-method gptq) demo file to calibrate on")
    c.add_argument("--max-tokens", type=int, help="(--quant-method gptq) stop after this many demo tokens")
    output_dir(c)
    c.set_defaults(func=cmd_export)

    c = command("prune", "profile + select + export in one go")
    c.add_argument("model", help="local checkpoint folder or Hugging Face Hub id")
    demos(c)
    selection(c)
    output_dir(c)
    c.add_argument("--save-pattern", help="also write the pattern here")
    c.add_argument("--unstructured", type=float, metavar="SPARSITY",
                   help="also zero this fraction of each kept expert's weights per output row (Wanda with "
                        "routing-weighted demo activations)")
    c.add_argument("--nm", metavar="N:M", help="also prune kept experts N:M (e.g. 2:4) instead")
    c.add_argument("--dynamic-prune", type=float, metavar="F",
                   help="also skip about a share F of the routed expert calls at run time (MC-MoE online dynamic "
                        "pruning, calibrated on the demos; stored in the export for moeprune.from_pretrained)")
    dynamic_method(c)
    runtime(c)
    _add_method_options(c)
    c.set_defaults(func=cmd_prune)

    c = command("inspect", "show a profile or pattern per layer (optionally as a heatmap)")
    c.add_argument("file", help="profile (.safetensors) or pattern (.json)")
    c.add_argument("--plot", help="write a heatmap of expert usage / kept experts to this PNG")
    c.set_defaults(func=cmd_inspect)

    c = command("eval", "perplexity of a model, an export or a model + pattern on texts, and its active expert share")
    c.add_argument("model", help="local checkpoint folder (an export too) or Hugging Face Hub id")
    c.add_argument("--texts", required=True, help="texts: JSONL (text | messages | input_ids) or plain text")
    c.add_argument("--pattern", help="keep only this pattern's experts (a pattern file or a store task)")
    c.add_argument("--dynamic-prune", type=float, metavar="F",
                   help="skip about a share F of the routed expert calls (MC-MoE online dynamic pruning, "
                        "threshold calibrated on --demos)")
    dynamic_method(c)
    c.add_argument("--demos", help="(--dynamic-prune) the task's demos the threshold is calibrated on")
    c.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens of the texts")
    runtime(c)
    c.set_defaults(func=cmd_eval)

    c = command("store", "manage a pattern store: add, list, show, remove")
    c.add_argument("action", choices=["add", "list", "show", "remove"])
    c.add_argument("store", help="store folder")
    c.add_argument("target", nargs="?", metavar="MODEL|TASK",
                   help="add: the checkpoint to profile; show/remove: the task")
    c.add_argument("--task", help="add: the task name to store under")
    c.add_argument("--pattern", help="(add) store an existing pattern file instead of profiling")
    c.add_argument("--demos", help="(add) demo file to profile")
    c.add_argument("--max-tokens", type=int)
    c.add_argument("--method", default="tcess", choices=methods)
    c.add_argument("--keep", default="0.5", help="(add) experts kept per layer (default 0.5)")
    protect(c)
    c.add_argument("--overwrite", action="store_true", help="(add) replace the task if the store has it")
    runtime(c)
    c.set_defaults(func=cmd_store)

    c = command("retrieve", "pick the stored task pattern for each query (router-signature nearest neighbour)")
    c.add_argument("store", help="store folder")
    q = c.add_mutually_exclusive_group(required=True)
    q.add_argument("--query", action="append", help="query text (repeatable)")
    q.add_argument("--queries", help="JSONL (text | messages | input_ids) or a text file, one query per line")
    c.add_argument("--model", help="checkpoint (default: the one the patterns were profiled on)")
    c.add_argument("--layers", default="first", choices=["first", "all"],
                   help="router layers in the signature: first MoE layer (PreMoe, cheap) or all (full model)")
    c.add_argument("--threshold", default="auto",
                   help="distance beyond which the general (union) pattern is used: auto (set per task from the "
                        "demos, default), a number, or <0 to disable")
    runtime(c)
    c.set_defaults(func=cmd_retrieve)

    c = command("serve", "serve MODEL over an OpenAI-compatible HTTP API, experts following each request's task")
    c.add_argument("model", help="local checkpoint folder or Hugging Face Hub id")
    c.add_argument("--store", required=True, help="pattern store folder (moeprune store add)")
    c.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    c.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    c.add_argument("--cache-gb", type=float, default=4.0,
                   help="cache for experts of inactive patterns (GiB, default 4)")
    c.add_argument("--bits", type=int, choices=widths, help="quantize experts to this width as they are read")
    c.add_argument("--threshold", default="auto",
                   help="retrieval distance beyond which the general (union) pattern is used: auto (from the "
                        "demos, default), a number, or <0 to disable")
    c.add_argument("--model-id", help="the base model's id in /v1/models (default: the folder name or Hub id)")
    c.add_argument("--max-batch", type=int, default=8, help="requests per generation batch (default 8)")
    c.add_argument("--max-wait", type=float, default=1.0,
                   help="seconds a request of another task may wait before the server switches (default 1)")
    c.add_argument("--no-prefetch", action="store_true",
                   help="do not read the next queued task's experts into the page cache during a batch")
    c.add_argument("--max-tokens-cap", type=int, default=1024, help="largest max_tokens a request may ask (1024)")
    c.add_argument("--max-body-kb", type=float, default=1024, help="largest request body in KiB (default 1024)")
    c.add_argument("--dynamic-prune", type=float, metavar="F",
                   help="also skip about a share F of the routed expert calls (MC-MoE online dynamic pruning, "
                        "threshold calibrated on --demos; default: the one an export stores, if any)")
    dynamic_method(c)
    c.add_argument("--demos", help="(--dynamic-prune) demos the threshold is calibrated on")
    runtime(c)
    c.set_defaults(func=cmd_serve)

    c = command("demo", "prune the embedded model per domain; compare perplexity full vs pruned")
    c.add_argument("--method", default="tcess", choices=methods)
    c.add_argument("--keep", default="0.5", help="fraction or count of experts kept per layer (default 0.5)")
    c.add_argument("--model", help="another checkpoint with the embedded model's domains (default: embedded)")
    runtime(c, dtype="float32")
    c.set_defaults(func=cmd_demo)
    return p


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _check_device(device: str | None) -> None:
    import torch

    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgument(f"--device {device}: this torch sees no CUDA GPU (a CPU build, or no GPU visible); "
                              "use --device cpu")


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so flushing what is left at exit does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (captured)
        pass


def _one_line(text: str) -> str:
    return " ".join(text.split())  # one line, even for multi-line library messages


def _report(exc: BaseException, command: str, as_json: bool) -> None:
    """One line on stderr (and a JSON document on stdout with ``--json``) for a refused input."""
    if os.environ.get("MOEPRUNE_DEBUG"):
        traceback.print_exc()
    words = flag_words if isinstance(exc, MoePruneError) else str  # OSError text is the system's own
    msg = _one_line(words(str(exc)))
    if as_json:
        doc = {"error": msg, "type": type(exc).__name__}
        if getattr(exc, "hint", None):
            doc["hint"] = _one_line(words(exc.hint))
        print(json.dumps(doc))
    print(f"{command}: error: {msg}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # a killed job unwinds
    command = "moeprune"
    try:
        import moeprune.io.checkpoint  # noqa: F401  (torch and transformers load here: Ctrl-C is handled)

        args = build_parser().parse_args(argv)
        command = f"moeprune {args.command}"
        if not _progress(args):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()  # -q: no load reports either, only errors
        try:
            _check_device(getattr(args, "device", None))
            args.func(args)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        except BrokenPipeError:  # `moeprune ... | head` stopped reading: end quietly, as shell tools do
            _silence_stdout()
            return 128 + signal.SIGPIPE
        except (MoePruneError, OSError) as exc:  # refused input; anything else is a bug: its traceback shows
            _report(exc, command, args.json)
            return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted; no output was left half-written", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
