"""The end-to-end jobs behind the CLI and the Python API: profile, select, export, prune."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from moeprune.demos import demo_hash, encode_demos, read_demos
from moeprune.errors import InvalidArgument
from moeprune.export import expert_input_dims, export_pruned
from moeprune.fingerprint import Fingerprint, checkpoint_fingerprint
from moeprune.io.atomic import check_dir_target
from moeprune.io.checkpoint import Checkpoint, open_checkpoint
from moeprune.loader.selective import load_model, load_with_pattern
from moeprune.methods.dynamic_setup import calibrate_rule, calibration_request
from moeprune.methods.scoring import default_budget, needs_checkpoint, score_merging
from moeprune.methods.select import make_pattern
from moeprune.modeling import load_tokenizer, max_context, parse_dtype
from moeprune.patterns.pattern import ExpertPattern
from moeprune.profiling.profile import RouterProfile, profile_model


@dataclass
class Workspace:
    """A checkpoint with its loaded model and encoded demos: what profiling and model-reading scorers use."""

    ckpt: Checkpoint
    fingerprint: Fingerprint
    model: Any
    tokenizer: Any
    demos: list[list[int]]
    demo_path: Path


def open_workspace(model: str | Path | Checkpoint, demos: str | Path, max_tokens: int | None = None,
                   device: str = "cpu", dtype: str | torch.dtype | None = "auto",
                   fingerprint: Fingerprint | None = None) -> Workspace:
    """``model`` loaded with its demos encoded (``fingerprint``: the checkpoint's, if already taken)."""
    ckpt = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    fingerprint = fingerprint or checkpoint_fingerprint(ckpt)
    records = read_demos(demos)  # a bad demo file is refused before the model loads
    net, tokenizer = load_model(ckpt, device, dtype)
    encoded = encode_demos(records, tokenizer, max_length=max_context(net), max_tokens=max_tokens,
                           vocab_size=getattr(net.config, "vocab_size", None))
    return Workspace(ckpt, fingerprint, net, tokenizer, encoded, Path(demos))


def profile_workspace(ws: Workspace, task: str = "", progress: bool = True) -> RouterProfile:
    profile = profile_model(ws.model, ws.demos, ws.fingerprint, task=task or ws.demo_path.stem,
                            demo_hash=demo_hash(ws.demos), progress=progress)
    profile.model = ws.ckpt.source
    return profile


def profile_checkpoint(model: str | Path, demos: str | Path, task: str = "", max_tokens: int | None = None,
                       device: str = "cpu", dtype: str | torch.dtype | None = "auto",
                       progress: bool = True, offload: bool = False) -> RouterProfile:
    """Profile a checkpoint (local folder or Hub id) on a demo file.

    ``offload=True`` materializes one decoder layer at a time (for models larger than memory).
    """
    if not offload:
        return profile_workspace(open_workspace(model, demos, max_tokens, device, dtype), task, progress)
    from moeprune.profiling.offload import profile_offloaded

    ckpt = open_checkpoint(model)
    encoded = encode_demos(read_demos(demos), load_tokenizer(ckpt), ckpt.config.get("max_position_embeddings"),
                           max_tokens, vocab_size=ckpt.config.get("vocab_size"))
    torch_dtype = parse_dtype(dtype)
    profile = profile_offloaded(ckpt, encoded, checkpoint_fingerprint(ckpt), task=task or Path(demos).stem,
                                demo_hash=demo_hash(encoded), device=device,
                                dtype=None if torch_dtype == "auto" else torch_dtype, progress=progress)
    profile.model = ckpt.source
    return profile


def check_budget(fingerprint: Fingerprint, method: str, keep: str | float, budget: str | None = None,
                 min_per_layer: int | None = None) -> str:
    """Refuse a method/keep/budget combination that cannot be selected, before any work; returns the
    budget (default: the method's own)."""
    from moeprune.methods.scoring import SCORERS, scores_mass
    from moeprune.methods.select import SelectionError, check_keep

    if method not in SCORERS:
        raise InvalidArgument(f"unknown method {method!r}; choose one of {', '.join(sorted(SCORERS))}")
    budget = budget or default_budget(method)
    if budget == "top-p" and default_budget(method) == "global":
        raise SelectionError(f"{method} decides per-layer counts itself", hint="use budget=global with it")
    if budget == "top-p" and not scores_mass(method):
        raise SelectionError(f"budget=top-p cuts mass-like scores (frequency, soft-count, output-aware); "
                             f"{method} is not one", hint="use budget=uniform or global with it")
    check_keep(fingerprint, keep, budget, min_per_layer)
    return budget


def select_pattern(profile: RouterProfile, method: str, keep: str | float, task: str | None = None,
                   budget: str | None = None, min_per_layer: int | None = None, model: Any = None,
                   demos: Sequence[Sequence[int]] | None = None, checkpoint: Checkpoint | str | Path | None = None,
                   progress: bool = False, protect_super_experts: bool = False, **params: Any) -> ExpertPattern:
    """Score a profile with ``method`` and keep ``keep`` experts per layer (on average for a global budget).

    ``protect_super_experts`` never prunes REAP's super experts (:func:`moeprune.methods.select.super_experts`, from
    the profile's per-expert largest activation); the pattern's ``meta["protected"]`` lists them.

    ``budget`` is ``uniform`` or ``global`` (default: the method's own). Scorers that read weights
    get ``checkpoint`` (default: the checkpoint the profile was made on); scorers that run the
    model get ``model`` (a loaded transformers model) and ``demos`` (encoded demos).
    """
    budget = check_budget(profile.fingerprint, method, keep, budget, min_per_layer)
    if checkpoint is None and profile.model and needs_checkpoint(method):
        checkpoint = profile.model
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        checkpoint = open_checkpoint(checkpoint)
    if checkpoint is not None and needs_checkpoint(method):  # its weights must be the profiled model's
        profile.fingerprint.check_compatible(checkpoint_fingerprint(checkpoint), "profile")
    scores, merging = score_merging(method, profile, model=model, demos=demos, checkpoint=checkpoint,
                                           keep=keep, budget=budget, min_per_layer=min_per_layer,
                                           progress=progress, **params)
    signature = (profile.stats["count"] / max(profile.tokens, 1)).flatten().tolist()  # routing shares
    protect, threshold = None, None
    if protect_super_experts:
        from moeprune.methods.select import super_experts

        max_act = profile.signal("max_act", "protect_super_experts=True")
        protect, threshold = super_experts(max_act, profile.fingerprint)
    pattern = make_pattern(scores, profile.fingerprint, keep, task=task or profile.task, method=method,
                           signature=signature, budget=budget, min_per_layer=min_per_layer, protect=protect)
    pattern.meta.update({"profile_tokens": profile.tokens, "demo_hash": profile.demo_hash, "model": profile.model})
    if threshold is not None:
        pattern.meta["super_expert_threshold"] = threshold
    if merging is not None and merging.clusters:
        pattern.merges = merges_for(pattern.kept, merging.clusters)
        pattern.merge_weights = merge_weights_for(pattern.merges, merging)
        pattern.merge_router = merging.merge_router if pattern.merges else "average"
        pattern.merge_align = merging.merge_align if pattern.merges else "none"
        pattern.router_overrides = merging.router_overrides
        pattern.__post_init__()
    return pattern


def merge_weights_for(merges: dict[int, dict[int, list[int]]] | None,
                      merging: Any) -> dict[int, dict[int, list[float]]] | None:
    """The scorer's member weights of each kept merge (``merges_for``'s clusters), None without weights."""
    if not merges or not merging.weights:
        return None
    out: dict[int, dict[int, list[float]]] = {}
    for layer, chosen in merges.items():
        by_cluster = {tuple(sorted(c)): w for c, w in zip(merging.clusters[layer], merging.weights[layer])}
        out[layer] = {e: list(by_cluster[tuple(members)]) for e, members in chosen.items()}
    return out


def calibrate_dynamic(ckpt: Checkpoint, pattern: ExpertPattern, demos: Sequence[Sequence[int]], request: Any,
                      device: str = "cpu", dtype: str | torch.dtype | None = "auto", progress: bool = False):
    """The run-time dynamic pruning ``request`` asks for (a fraction: MC-MoE's online dynamic pruning; or
    ``{"method", "fraction", ...}``, :mod:`moeprune.methods.dynamic_setup`) calibrated on ``demos`` for
    ``ckpt`` pruned to ``pattern`` (loaded with only the kept experts, as the export will run)."""
    req = calibration_request(request)
    if req is None:
        raise InvalidArgument(f"dynamic_prune={request!r} is no calibration request",
                              hint="give a fraction, or {'method': ..., 'fraction': ...}")
    torch_dtype = parse_dtype(dtype)
    net, _ = load_with_pattern(ckpt, pattern, device=device, dtype=None if torch_dtype == "auto" else torch_dtype)
    return calibrate_rule(net.eval(), demos, req, progress=progress)


def merges_for(kept: dict[int, list[int]],
               clusters: dict[int, list[list[int]]]) -> dict[int, dict[int, list[int]]] | None:
    """Per layer, each kept expert -> its cluster (clusters of one, or without exactly one kept member, drop out)."""
    merges = {}
    for layer, layer_clusters in clusters.items():
        chosen = {}
        for cluster in layer_clusters:
            members = [e for e in cluster if e in kept[layer]]
            if len(cluster) > 1 and len(members) == 1:
                chosen[members[0]] = sorted(cluster)
        if chosen:
            merges[layer] = chosen
    return merges or None


def profile_and_select(ws: Workspace, method: str, keep: str | float, task: str = "",
                       progress: bool = True, **select_kwargs: Any) -> tuple[RouterProfile, ExpertPattern]:
    """Profile a workspace's demos and select with ``method`` (scorers that run or read the model get
    the workspace's model, demos and checkpoint)."""
    profile = profile_workspace(ws, task, progress)
    pattern = select_pattern(profile, method, keep, model=ws.model, demos=ws.demos, checkpoint=ws.ckpt,
                             progress=progress, **select_kwargs)
    return profile, pattern


def prune(model: str | Path, demos: str | Path, method: str, keep: str | float, out: str | Path,
          task: str = "", max_tokens: int | None = None, device: str = "cpu",
          dtype: str | torch.dtype | None = "auto", overwrite: bool = False, progress: bool = True,
          max_shard_size: str | int = "2GB", budget: str | None = None, min_per_layer: int | None = None,
          unstructured: float | None = None, nm: str | None = None, bits: int | None = None,
          avg_bits: float | None = None, group_size: int = 128, dynamic_prune: float | dict | None = None,
          symmetric: bool = True, target: str | None = None, recalibrate_router: bool = False,
          recalibrate_steps: int | None = None, quant_method: str = "rtn",
          **params: Any) -> tuple[ExpertPattern, dict[str, Any]]:
    """Profile, select and export in one go; returns the pattern and the export summary.

    ``unstructured`` (a sparsity in [0, 1)) or ``nm`` ("2:4") also sparsify the kept experts'
    weights, Wanda-style with routing-weighted demo activations; ``bits`` or ``avg_bits`` quantize
    them (one width, or mixed per expert by the exact MC-MoE integer program). ``dynamic_prune`` (a
    fraction F: MC-MoE's online dynamic pruning; or ``{"method": "odp" | "naive" | "topany", "fraction": F}``,
    :mod:`moeprune.methods.dynamic_setup`) calibrates that rule on the pruned model and the demos and stores
    it in the export's ``moeprune`` config section (applied by ``moeprune.from_pretrained``).
    ``target="vllm"`` refuses, before any work, what vLLM could not load (``moeprune.io.engines``).
    ``recalibrate_router`` fits the kept router rows on the demos (KL to the full model, at most
    ``recalibrate_steps`` steps; :mod:`moeprune.recalibrate`) and exports them in the router's place.
    ``quant_method`` ``"gptq"`` quantizes with GPTQ calibrated on the demos (:mod:`moeprune.quantization.gptq_experts`).
    """
    check_quant_method(quant_method, bits, avg_bits, unstructured or nm)
    if unstructured and nm:
        raise InvalidArgument("unstructured=... and nm=... are two ways to sparsify the kept experts", hint="give one")
    ckpt = open_checkpoint(model)
    check_dir_target(out, overwrite, [ckpt.path, demos])  # what the export would refuse at the end, refused first
    fingerprint = checkpoint_fingerprint(ckpt)
    resolved = check_budget(fingerprint, method, keep, budget, min_per_layer)
    if target == "vllm":
        from moeprune.io.engines import check_vllm_target

        check_vllm_target(bits, avg_bits, symmetric, resolved == "uniform", ckpt.adapter.family, group_size,
                          _effective_group(ckpt, None, group_size, bits, avg_bits))
    ws = open_workspace(ckpt, demos, max_tokens, device, dtype, fingerprint)
    profile, pattern = profile_and_select(ws, method, keep, task, progress, budget=budget,
                                          min_per_layer=min_per_layer, **params)
    if recalibrate_router:
        from moeprune.recalibrate import recalibrate_pattern

        recalibrate_pattern(ws.ckpt, pattern, ws.model, ws.demos, steps=recalibrate_steps, device=device,
                            seed=params.get("seed") or 0, progress=progress)
    transform, extra = None, None
    if unstructured or nm:
        from moeprune.methods.unstructured import expert_transform, parse_nm, routed_input_norms

        norms = routed_input_norms(ws.model, ws.demos)
        transform = expert_transform(ws.ckpt, norms, unstructured, parse_nm(nm) if nm else None)
        extra = {"unstructured": {"sparsity": unstructured, "nm": nm}}
    if dynamic_prune:
        extra = dict(extra or {}, dynamic_prune=calibrate_dynamic(ws.ckpt, pattern, ws.demos, dynamic_prune, device,
                                                                  dtype, progress).to_dict())
    ckpt, encoded = ws.ckpt, ws.demos
    del ws
    if avg_bits is not None:
        from moeprune.quantization.mixed import allot_bits

        allot_bits(pattern, profile, ckpt, avg_bits, group_size=group_size)
    calibrated = None
    if quant_method == "gptq":
        calibrated = _gptq_codes(ckpt, pattern, encoded, bits, group_size, symmetric, progress, device)
    summary = export_pruned(ckpt, pattern, out, overwrite=overwrite, progress=progress,
                            max_shard_size=max_shard_size, transform=transform, extra_config=extra, bits=bits,
                            group_size=group_size, symmetric=symmetric, calibrated=calibrated)
    if calibrated is not None:
        summary["calibration"] = calibrated.summary()
    return pattern, summary


def _effective_group(ckpt: Checkpoint, pattern: ExpertPattern | None, group_size: int, bits: int | None,
                     avg_bits: float | None) -> int | None:
    """The group size an export would quantize with (None: no quantization, or none fits: the export says)."""
    if bits is None and avg_bits is None:
        return None
    from moeprune.quantization.compressed import common_group

    try:
        return common_group(expert_input_dims(ckpt, pattern), group_size)
    except InvalidArgument:
        return None


def check_quant_method(method: str, bits: int | None, avg_bits: float | None, sparsified: Any = None) -> None:
    """Refuse a ``--quant-method`` that cannot run, before any work."""
    if method not in ("rtn", "gptq"):
        raise InvalidArgument(f"quant_method={method!r} is not rtn or gptq")
    if method == "gptq" and bits is None and avg_bits is None:
        raise InvalidArgument("quant_method=gptq quantizes the experts", hint="give bits=N or avg_bits=B with it")
    if method == "gptq" and sparsified:
        raise InvalidArgument("quant_method=gptq and unstructured=.../nm=... both rewrite the kept experts' "
                              "weights", hint="give one of them")


def select_from_profiles(profiles: Sequence[str | Path | RouterProfile], method: str, keep: str | float,
                         task: str | None = None, budget: str | None = None, min_per_layer: int | None = None,
                         model: str | Path | None = None, demos: str | Path | None = None, device: str = "cpu",
                         dtype: str | torch.dtype | None = "float32", recalibrate_router: bool = False,
                         recalibrate_steps: int | None = None, progress: bool = False,
                         **params: Any) -> ExpertPattern:
    """The job behind ``moeprune select``: add up ``profiles`` and select ``method``'s pattern.

    ``model`` is the checkpoint for methods that read weights (default: the profiled one). With ``demos``
    (a demo file), methods that run the model get it loaded on ``device`` in ``dtype`` with the demos
    encoded; ``recalibrate_router`` then fits the kept router rows on them (:mod:`moeprune.recalibrate`).
    ``params`` are the method's own parameters.
    """
    from moeprune.methods.scoring import runs_model

    loaded = [p if isinstance(p, RouterProfile) else RouterProfile.load(p) for p in profiles]
    prof = loaded[0]
    for other in loaded[1:]:
        prof = prof + other
    check_budget(prof.fingerprint, method, keep, budget, min_per_layer)
    ckpt = net = encoded = None
    if recalibrate_router and not demos:
        raise InvalidArgument("recalibrate_router=True fits the router on the demos: give demos=FILE")
    run = bool(demos) and (runs_model(method) or recalibrate_router)  # on ``device``, in ``dtype``
    if model or (run and prof.model):
        ckpt = open_checkpoint(model or prof.model)
    if run:
        if ckpt is None:
            raise InvalidArgument("the profile names no model: give the checkpoint (model=...)")
        net, tokenizer = load_model(ckpt, device, dtype)
        encoded = encode_demos(read_demos(demos), tokenizer, vocab_size=ckpt.config.get("vocab_size"))
    pattern = select_pattern(prof, method, keep, task=task, budget=budget, min_per_layer=min_per_layer,
                             checkpoint=ckpt, model=net, demos=encoded, progress=progress, **params)
    if recalibrate_router:
        from moeprune.recalibrate import recalibrate_pattern

        recalibrate_pattern(ckpt, pattern, net, encoded, steps=recalibrate_steps, device=device,
                            seed=params.get("seed") or 0, progress=progress)
    return pattern


def export_pattern(model: str | Path, pattern: ExpertPattern | str | Path, out: str | Path,
                   profile: str | Path | RouterProfile | None = None, bits: int | None = None,
                   avg_bits: float | None = None, group_size: int = 128, symmetric: bool = True,
                   quant_method: str = "rtn", demos: str | Path | None = None, max_tokens: int | None = None,
                   target: str | None = None, max_shard_size: str | int = "2GB", overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """The job behind ``moeprune export``: write ``model`` keeping ``pattern``'s experts, quantized as asked.

    ``avg_bits`` allots mixed widths per expert from ``profile`` (the one the pattern came from);
    ``quant_method="gptq"`` calibrates GPTQ on ``demos``; ``target="vllm"`` refuses, before reading any
    weight, what vLLM could not load. Returns the export summary (with ``calibration`` for GPTQ).
    """
    pattern = pattern if isinstance(pattern, ExpertPattern) else ExpertPattern.load(pattern)
    if target == "vllm":  # from the pattern and the config alone, before reading any weight
        from moeprune.io.engines import check_vllm_target

        ckpt = open_checkpoint(model)
        check_vllm_target(bits, avg_bits, symmetric, pattern.is_uniform, ckpt.adapter.family, group_size,
                          _effective_group(ckpt, pattern, group_size, bits, avg_bits), pattern_given=True)
    if avg_bits is not None:
        from moeprune.quantization.mixed import allot_bits

        if not profile:
            raise InvalidArgument("avg_bits=... weighs experts by their use: give the profile the pattern came from "
                             "(--profile PROFILE), or use --bits N")
        allot_bits(pattern, profile if isinstance(profile, RouterProfile) else RouterProfile.load(profile),
                   open_checkpoint(model), avg_bits, group_size=group_size)
    calibrated = _gptq_for_export(model, pattern, quant_method, demos, bits, avg_bits, group_size, symmetric,
                                  max_tokens, progress)
    summary = export_pruned(model, pattern, out, max_shard_size=max_shard_size, overwrite=overwrite,
                            progress=progress, bits=bits, group_size=group_size, symmetric=symmetric,
                            calibrated=calibrated)
    if calibrated is not None:
        summary["calibration"] = calibrated.summary()
    return summary


def _gptq_for_export(model: str | Path, pattern: ExpertPattern, quant_method: str, demos: str | Path | None,
                     bits: int | None, avg_bits: float | None, group_size: int, symmetric: bool,
                     max_tokens: int | None, progress: bool) -> Any:
    """GPTQ codes calibrated on ``demos`` for an export (None for ``rtn``)."""
    check_quant_method(quant_method, bits, avg_bits)
    if quant_method != "gptq":
        return None
    if not demos:
        raise InvalidArgument("quant_method=gptq calibrates on demos: give demos=FILE (the pattern's demos)")
    ckpt = open_checkpoint(model)
    encoded = encode_demos(read_demos(demos), load_tokenizer(ckpt), ckpt.config.get("max_position_embeddings"),
                           max_tokens, vocab_size=ckpt.config.get("vocab_size"))
    return _gptq_codes(ckpt, pattern, encoded, bits, group_size, symmetric, progress)


def _gptq_codes(ckpt: Any, pattern: ExpertPattern, encoded: list[list[int]], bits: int | None, group_size: int,
                symmetric: bool, progress: bool, device: str = "cpu") -> Any:
    """GPTQ codes for ``pattern``'s experts, calibrated through the pruned model in the export's float dtype."""
    from moeprune.quantization.gptq_experts import calibrate, check_gptq
    from moeprune.quantization.stored_formats import float_dtype

    check_gptq(ckpt)  # before the model loads
    net, _ = load_with_pattern(ckpt, pattern, device=device, dtype=float_dtype(ckpt.config))
    return calibrate(net, ckpt, pattern, encoded, bits=bits, group_size=group_size, symmetric=symmetric,
                     progress=progress)
