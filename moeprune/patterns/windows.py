"""Retrieval signature spec 2: demo windows, a fused lexical + routing classifier, and novelty.

A pattern keeps, per demo, *windows* cut from the demo's text at query lengths (``WINDOW_CHARS``): its
opening and ``INNER_PER_LENGTH`` windows starting at evenly spaced line starts. Each window carries its
routing signature computed exactly as a query's (:func:`moeprune.patterns.retrieval.query_signatures`, first
MoE layer), so the stored signatures look like queries, not like whole documents.

At retrieval two classifiers are fitted on the store's windows (scikit-learn, about a second):

- routing: multinomial logistic regression on the square roots of the routing shares (Hellinger map);
- lexical: logistic regression on character 1-4-gram TF-IDF (sublinear term frequency).

Their class probabilities are multiplied (a product of experts) and the largest wins.

Novelty: a query whose best lexical cosine similarity to the chosen task's windows is below that task's
threshold goes to the general (union) pattern. ``threshold="auto"`` sets the threshold per task and
window length from the demos alone: the ``NOVELTY_QUANTILE`` quantile of each window's similarity to the
task's windows cut from *other* demos (leave one demo out), i.e. the share of in-store queries expected
to be sent to the fallback. Numbers are in BENCHMARKS.md ("Retrieval").

A store mixing this spec with another is refused: the spec id is saved in every pattern.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moeprune.errors import IncompatibleError, InvalidArgument

WINDOW_CHARS = (30, 100, 200, 400)
INNER_PER_LENGTH = 2
NOVELTY_QUANTILE = 0.02  # expected share of in-store queries sent to the fallback (the 2-point budget)
SPEC_ID = "moeprune.retrieval/2 windows=30,100,200,400 inner=2 routing=first-layer-topk-context lexical=char1-4"
LEXICAL_C, ROUTING_C = 10.0, 1.0


class SignatureSpecError(IncompatibleError):
    """Stored retrieval data was made by another signature spec."""


def record_text(record: dict[str, Any]) -> str:
    """The text a demo or query record stands for (chat turns joined by newlines)."""
    if "text" in record:
        return str(record["text"])
    if "messages" in record:
        parts = []
        for m in record["messages"]:
            c = m.get("content", "")
            parts.append(c if isinstance(c, str)
                         else " ".join(str(x.get("text", "")) for x in c if isinstance(x, dict)))
        return "\n".join(parts)
    return ""


def cut_windows(text: str, lengths: Sequence[int] = WINDOW_CHARS, inner: int = INNER_PER_LENGTH) -> list[str]:
    """Deterministic query-length windows of ``text``: per length, the opening and ``inner`` windows
    starting at evenly spaced line starts (a text no longer than a length is one window); distinct."""
    text = text.strip()
    if not text:
        return []
    starts = [m.end() for m in re.finditer(r"\n\s*", text)]
    out: list[str] = []
    for n in lengths:
        if len(text) <= n:
            out.append(text)
            continue
        out.append(text[:n])
        cands = [s for s in starts if s + n <= len(text)]
        if cands and inner:
            picks = np.linspace(0, len(cands) - 1, inner + 2)[1:-1] if len(cands) > inner else range(len(cands))
            out += [text[cands[int(round(i))]: cands[int(round(i))] + n] for i in picks]
    seen, uniq = set(), []
    for w in (w.strip() for w in out):
        if w and w not in seen:
            seen.add(w)
            uniq.append(w)
    return uniq


def demo_windows(records: Sequence[dict[str, Any]], tokenizer: Any = None) -> list[tuple[int, str]]:
    """``(demo index, window text)`` for every window of every demo with text (token-id demos are
    decoded when a tokenizer is given)."""
    def text(r):
        if "input_ids" in r and "text" not in r:
            return tokenizer.decode(r["input_ids"], skip_special_tokens=True) if tokenizer is not None else ""
        return record_text(r)
    return [(i, w) for i, r in enumerate(records) for w in cut_windows(text(r))]


def spec_of(pattern: Any) -> str | None:
    data = pattern.meta.get("retrieval")
    return data.get("spec") if isinstance(data, dict) else None


def check_specs(patterns: Sequence[Any]) -> bool:
    """True when every pattern has windows of this spec, False when none has any; refuses a mixture
    or another spec (a store whose signatures were made another way)."""
    specs = {p.task: spec_of(p) for p in patterns}
    if all(s is None for s in specs.values()):
        return False
    bad = {t: s for t, s in specs.items() if s != SPEC_ID}
    if bad:
        t, s = next(iter(bad.items()))
        made = f"signature spec {s!r}" if s else "no demo windows (an older moeprune)"
        raise SignatureSpecError(
            f"pattern {t!r} was made with {made}, not {SPEC_ID!r} like this moeprune's: retrieval would compare "
            f"signatures made two ways. Re-add it: `moeprune store add STORE MODEL --demos FILE --task {t} "
            "--overwrite`")
    return True


def _sqrt_rows(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip(x, 0.0, None))


@dataclass
class Decision:
    task_index: int
    proba: np.ndarray
    similarity: float  # best lexical cosine similarity to the chosen task's windows
    threshold: float  # the similarity under which the query is novel (auto or fixed)


class WindowClassifier:
    """Fused routing + lexical classifier over the stored windows of several tasks."""

    def __init__(self, tasks: Sequence[str], windows: Sequence[Sequence[tuple[int, str, Sequence[float]]]],
                 lexical: bool = True, routing: bool = True, lexical_c: float = LEXICAL_C,
                 routing_c: float = ROUTING_C, quantile: float = NOVELTY_QUANTILE,
                 lengths: Sequence[int] = WINDOW_CHARS):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        if not (lexical or routing):
            raise InvalidArgument("a window classifier needs the lexical or the routing term (or both)")
        self.tasks = list(tasks)
        self.lengths = np.asarray(lengths, dtype=float)
        y, demo, texts, sigs = [], [], [], []
        for t, wins in enumerate(windows):
            for i, text, sig in wins:
                y.append(t)
                demo.append(i)
                texts.append(text)
                sigs.append(sig)
        self.y, self.demo = np.asarray(y), np.asarray(demo)
        self.lens = np.asarray([len(t) for t in texts])
        self.use_lexical, self.use_routing = lexical, routing
        single = len(self.tasks) == 1
        self.tfidf = TfidfVectorizer(analyzer="char", ngram_range=(1, 4), sublinear_tf=True, lowercase=False,
                                     dtype=np.float64)
        self.X_lex = self.tfidf.fit_transform(texts)
        self.lex = (None if single or not lexical
                    else LogisticRegression(C=lexical_c, max_iter=3000).fit(self.X_lex, self.y))
        X_r = _sqrt_rows(np.asarray(sigs, dtype=np.float64))
        self.rout = None if single or not routing else LogisticRegression(C=routing_c, max_iter=3000).fit(X_r, self.y)
        self.quantile = quantile
        self.auto = self._loo_thresholds()

    # --- novelty ----------------------------------------------------------------------
    def _bucket(self, n_chars: np.ndarray) -> np.ndarray:
        return np.abs(np.log(np.maximum(n_chars, 1)[:, None] / self.lengths[None, :])).argmin(1)

    def _loo_thresholds(self) -> np.ndarray:
        """``[tasks, lengths]`` similarity thresholds: per task and window length, the ``quantile`` of
        each window's best similarity to the task's windows of other demos."""
        th = np.zeros((len(self.tasks), len(self.lengths)))
        buckets = self._bucket(self.lens)
        for t in range(len(self.tasks)):
            idx = np.flatnonzero(self.y == t)
            sim = (self.X_lex[idx] @ self.X_lex[idx].T).toarray()
            same_demo = self.demo[idx][:, None] == self.demo[idx][None, :]
            sim[same_demo] = -1.0
            best = sim.max(1)
            ok = best > -1.0  # a task with one demo has nothing to leave out against
            for b in range(len(self.lengths)):
                vals = best[ok & (buckets[idx] == b)]
                if not len(vals):
                    vals = best[ok]
                th[t, b] = float(np.quantile(vals, self.quantile)) if len(vals) else 0.0
        return th

    # --- prediction ---------------------------------------------------------------------
    def proba(self, texts: Sequence[str], signatures: np.ndarray) -> np.ndarray:
        n = len(texts)
        if len(self.tasks) == 1:
            return np.ones((n, 1))
        logp = np.zeros((n, len(self.tasks)))
        if self.lex is not None:
            logp += np.log(np.clip(self.lex.predict_proba(self.tfidf.transform(texts)), 1e-12, None))
        if self.rout is not None:
            logp += np.log(np.clip(self.rout.predict_proba(_sqrt_rows(np.atleast_2d(signatures))), 1e-12, None))
        logp -= logp.max(1, keepdims=True)
        p = np.exp(logp)
        return p / p.sum(1, keepdims=True)

    def decide(self, texts: Sequence[str], signatures: np.ndarray,
               threshold: float | str | None = "auto") -> list[Decision]:
        """Per query, the chosen task, its probabilities, its lexical similarity and the threshold
        (``"auto"``: the demos' leave-one-out one; a number: a fixed minimum similarity; None: none)."""
        p = self.proba(texts, signatures)
        choice = p.argmax(1)
        S = (self.tfidf.transform(texts) @ self.X_lex.T).toarray()  # cosine similarities (rows are l2-normed)
        buckets = self._bucket(np.asarray([len(t) for t in texts]))
        out = []
        for q, t in enumerate(choice):
            sim = float(S[q, self.y == t].max())
            th = (float(self.auto[t, buckets[q]]) if threshold == "auto"
                  else -np.inf if threshold is None else float(threshold))
            out.append(Decision(int(t), p[q], sim, th))
        return out
