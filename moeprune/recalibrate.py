"""Router re-calibration after pruning: fit the kept router rows so the pruned model's next-token
distribution matches the full model's on the demos.

Every weight of the pruned model (loaded as the export will run: kept and merged experts, the
pattern's router tensors) is frozen except its router tensors: the kept rows of each MoE layer's
logits matrix, and the router's bias and selection bias where the family has them (GPT-OSS'
router bias, DeepSeek-V3-style ``e_score_correction_bias``, ERNIE's ``moe_statics``). The loss is
KL(full || pruned) of the next-token distributions, averaged over the demo tokens; Adam, a bounded
number of steps (one demo each, in a seeded order), cosine learning-rate schedule. The full model's
log-probabilities are computed once and kept when they fit ``TEACHER_CACHE_BYTES``, else recomputed
per step. The KL on all demos is measured before and after; if training did not lower it, the
original rows are returned (and the report says so).

Gradients reach the router through the top-k routing weights (the choice of experts is not
differentiable; the renormalised softmax weights of the chosen experts are). A selection bias that
only decides the choice (DeepSeek-V3's ``e_score_correction_bias``: the weights come from the
unbiased scores) therefore gets no gradient and stays as it is; it is trained where it does enter
the weights. The result is a set of
new router tensors (checkpoint key -> kept rows), carried by the pattern (its router sidecar) into
the export, where they replace the checkpoint's router tensors; every other tensor is unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moeprune.errors import InvalidArgument
from moeprune.io.checkpoint import Checkpoint
from moeprune.patterns.pattern import ExpertPattern

TEACHER_CACHE_BYTES = 1 << 30  # full-model log-probabilities kept in memory (else recomputed per step)


def router_keys(ckpt: Checkpoint, pattern: ExpertPattern) -> list[str]:
    """Checkpoint keys of the router tensors of the pattern's MoE layers (sliced to the kept rows on export)."""
    from moeprune.io.plan import plan_tensors

    adapter = ckpt.adapter
    return [p.source for p in plan_tensors(ckpt, pattern, dequantize=True) if p.rows is not None
            and any(adapter.router_axis(layer, p.source) is not None for layer in pattern.kept)]


def _trainable(model: Any, ckpt: Checkpoint, keys: list[str]) -> dict[str, torch.Tensor]:
    adapter = ckpt.adapter
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    out = {}
    for key in keys:
        name = adapter.memory_name(key)
        if name not in named:
            raise RuntimeError(f"router tensor {key} has no in-memory tensor {name}: report this as a moeprune bug")
        if named[name].is_floating_point():
            out[key] = named[name]
    return out


def _log_probs(model: Any, ids: Sequence[int], device: Any) -> torch.Tensor:
    return F.log_softmax(model(torch.tensor([list(ids)], device=device), use_cache=False).logits[0].float(), -1)


def _kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student)."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()


@torch.no_grad()
def demo_kl(teacher: Any, student: Any, demos: Sequence[Sequence[int]]) -> float:
    """Token-weighted mean KL(teacher || student) of the next-token distributions over ``demos``."""
    device = next(student.parameters()).device
    total, n = 0.0, 0
    for ids in demos:
        t = _log_probs(teacher, ids, next(teacher.parameters()).device).to(device)
        s = _log_probs(student, ids, device)
        total += float(_kl(t, s)) * len(ids)
        n += len(ids)
    return total / max(n, 1)


def recalibrate_router(ckpt: Checkpoint, pattern: ExpertPattern, teacher: Any, demos: Sequence[Sequence[int]],
                       steps: int | None = None, lr: float = 3e-3, seed: int = 0, device: str | torch.device = "cpu",
                       progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """New router tensors (checkpoint key -> kept rows, float32) for ``ckpt`` pruned to ``pattern``,
    fitted so the pruned model's next-token distribution matches ``teacher``'s (the full model) on
    ``demos``; and a report (steps, KL before and after, whether the fit was kept)."""
    from moeprune.loader.selective import load_with_pattern

    if not demos:
        raise InvalidArgument("router re-calibration fits on the demos: give at least one demo")
    demos = [list(d) for d in demos if len(d) >= 2]
    if not demos:
        raise InvalidArgument("router re-calibration needs demos of at least two tokens")
    student, _ = load_with_pattern(ckpt, pattern, device=device, dtype=torch.float32)
    student.eval()
    keys = router_keys(ckpt, pattern)
    params = _trainable(student, ckpt, keys)
    initial = {k: p.detach().clone() for k, p in params.items()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    teacher_device = next(teacher.parameters()).device
    cache_bytes = sum(len(d) for d in demos) * teacher.config.vocab_size * 4
    with torch.no_grad():
        cached = ([_log_probs(teacher, d, teacher_device).cpu() for d in demos]
                  if cache_bytes <= TEACHER_CACHE_BYTES else None)
    kl_before = demo_kl(teacher, student, demos)
    steps = steps if steps is not None else min(400, max(50, 4 * len(demos)))
    order = torch.randperm(len(demos), generator=torch.Generator().manual_seed(seed)).tolist()
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    bar = tqdm(range(steps), desc="router re-calibration", unit="step", disable=not progress)
    for step in bar:
        i = order[step % len(order)]
        if cached is not None:
            target = cached[i].to(device)
        else:
            with torch.no_grad():
                target = _log_probs(teacher, demos[i], teacher_device).to(device)
        loss = _kl(target, _log_probs(student, demos[i], device))
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(kl=f"{loss.item():.4f}")
    for p in params.values():
        p.requires_grad_(False)
    kl_after = demo_kl(teacher, student, demos)
    kept = kl_after < kl_before
    result = {k: (p.detach() if kept else initial[k]).float().cpu().clone() for k, p in params.items()}
    report = {"steps": steps, "lr": lr, "seed": seed, "kl_before": kl_before, "kl_after": kl_after,
              "applied": kept, "tensors": len(result)}
    return result, report


def recalibrate_pattern(ckpt: Checkpoint, pattern: ExpertPattern, teacher: Any, demos: Sequence[Sequence[int]],
                        progress: bool = True, **kwargs: Any) -> ExpertPattern:
    """``pattern`` carrying re-calibrated router tensors (its sidecar), the report in ``meta``."""
    overrides, report = recalibrate_router(ckpt, pattern, teacher, demos, progress=progress, **kwargs)
    pattern.router_overrides = overrides
    pattern.meta["router_recalibration"] = report
    pattern.validate()
    return pattern
