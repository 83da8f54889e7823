"""The main job on the embedded model: per domain, prune to the experts it needs and compare
in-domain perplexity of the full and the pruned model. Also the engine of the quality benchmark."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from moeprune import embedded
from moeprune.demos import demo_hash, encode_demos, read_demos
from moeprune.evaluate import perplexity
from moeprune.export import export_pruned
from moeprune.fingerprint import checkpoint_fingerprint
from moeprune.io.checkpoint import open_checkpoint
from moeprune.loader.selective import load_model
from moeprune.modeling import max_context
from moeprune.patterns.pattern import ExpertPattern
from moeprune.pipeline import select_pattern
from moeprune.profiling.profile import RouterProfile, profile_model


@dataclass
class DomainResult:
    domain: str
    method: str
    keep: str
    ppl_full: float
    ppl_pruned: float
    kept: dict[int, list[int]]
    cross: dict[str, float] | None = None  # other domain -> ppl of this domain's pruned model there
    method_passes: int = 0  # model forward calls the method made beyond the shared profile
    ppl_recal: float | None = None  # with the kept router rows re-calibrated (``run(recalibrate=True)``)

    @property
    def ratio(self) -> float:
        return self.ppl_pruned / self.ppl_full

    @property
    def recal_ratio(self) -> float | None:
        return None if self.ppl_recal is None else self.ppl_recal / self.ppl_full

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "method": self.method, "keep": self.keep, "ppl_full": self.ppl_full,
                "ppl_pruned": self.ppl_pruned, "ratio": self.ratio,
                "kept": {str(k): v for k, v in self.kept.items()}, "cross": self.cross}


class EmbeddedBench:
    """The embedded model with its domains' profiles and eval sets, loaded once."""

    def __init__(self, model: str | Path | None = None, domains: Iterable[str] | None = None,
                 progress: bool = False, device: str = "cpu", dtype: str = "float32"):
        self.path = Path(model) if model else embedded.model_dir()
        self.ckpt = open_checkpoint(self.path)
        self.fingerprint = checkpoint_fingerprint(self.ckpt)
        self.device, self.dtype = device, dtype
        self.model, self.tokenizer = load_model(self.ckpt, device, dtype)
        self.domains = list(domains or embedded.domains())
        self.progress = progress
        ctx = max_context(self.model)
        self.demos = {d: encode_demos(read_demos(embedded.demo_file(d)), self.tokenizer, ctx) for d in self.domains}
        self.evals = {d: encode_demos(read_demos(embedded.demo_file(d, "eval")), self.tokenizer, ctx)
                      for d in self.domains}
        self.profiles: dict[str, RouterProfile] = {
            d: profile_model(self.model, self.demos[d], self.fingerprint, task=d, demo_hash=demo_hash(self.demos[d]),
                             progress=progress)
            for d in self.domains
        }
        self.full_ppl = {d: perplexity(self.model, self.evals[d]) for d in self.domains}

    def pruned_model(self, pattern: ExpertPattern, bits: int | None = None):
        """Export ``pattern`` (optionally quantized) to a temporary folder and load it back."""
        from moeprune.api import from_pretrained

        with tempfile.TemporaryDirectory() as tmp:
            export_pruned(self.ckpt, pattern, Path(tmp) / "pruned", progress=False, bits=bits)
            return from_pretrained(Path(tmp) / "pruned", device=self.device, dtype=self.dtype)

    def run(self, domain: str, method: str, keep: str, cross: bool = False, bits: int | None = None,
            avg_bits: float | None = None, recalibrate: bool = False, **params: Any) -> DomainResult:
        """Prune ``domain`` with ``method`` at ``keep`` and evaluate; ``recalibrate`` also evaluates the
        same selection with its kept router rows re-calibrated on the domain's demos (``ppl_recal``)."""
        calls = [0]
        counter = self.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        try:
            pattern = select_pattern(self.profiles[domain], method, keep, model=self.model, demos=self.demos[domain],
                                     checkpoint=self.ckpt, **params)
        finally:
            counter.remove()
        if avg_bits is not None:
            from moeprune.quantization.mixed import allot_bits

            allot_bits(pattern, self.profiles[domain], self.ckpt, avg_bits)
        pruned = self.pruned_model(pattern, bits)
        others = None
        if cross:
            others = {d: perplexity(pruned, self.evals[d]) / self.full_ppl[d] for d in self.domains if d != domain}
        ppl_pruned, ppl_recal = perplexity(pruned, self.evals[domain]), None
        if recalibrate:
            from moeprune.recalibrate import recalibrate_pattern

            recalibrate_pattern(self.ckpt, pattern, self.model, self.demos[domain], progress=False)
            ppl_recal = perplexity(self.pruned_model(pattern, bits), self.evals[domain])
        return DomainResult(domain, method, str(keep), self.full_ppl[domain], ppl_pruned, pattern.kept, others,
                            calls[0], ppl_recal)


def run_demo(method: str = "tcess", keep: str = "0.5", model: str | Path | None = None,
             progress: bool = True, device: str = "cpu", dtype: str = "float32") -> list[DomainResult]:
    from moeprune.pipeline import check_budget

    # a bad --keep or method is refused before minutes of loading and profiling, as `prune` does
    check_budget(checkpoint_fingerprint(open_checkpoint(model or embedded.model_dir())), method, keep)
    bench = EmbeddedBench(model, progress=progress, device=device, dtype=dtype)
    return [bench.run(d, method, keep) for d in bench.domains]
