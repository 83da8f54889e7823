"""Retrieval signature spec 2: demo windows, a fused lexical + routing classifier, and novelty.

A pattern keeps, per demo, *windows* cut from the demo's text at query lengths (``WINDOW_CHARS``): its
opening and ``INNER_PER_LENGTH`` windows starting at evenly spaced line starts. Each window carries its
routing signature computed exactly as a query's (:func:`moeprune.patterns.retrieval.query_signatures`, first
MoE layer), so the stored signatures look like queries, not like whole documents.

At retrieval two classifiers are fitted on the store's windows (scikit-learn; seconds, about five times
that with the routing weight's folds, once per store content: the fit is cached, see :func:`fit_key`):

- routing: multinomial logistic regression on the square roots of the routing shares (Hellinger map);
- lexical: logistic regression on character n-gram TF-IDF of the text and of its shape (letters and digits
  replaced by their class: layout apart from words; :class:`LexicalFeatures`).

Their log-probabilities are added, the routing term weighted by the candidate of ``ROUTING_WEIGHTS`` with the
lowest leave-demos-out log-loss on the store's own windows (so a model whose routers do not separate the
stored domains leans on the text), and the largest wins.

Novelty (``threshold="auto"``, the default): a query no stored task fits goes to the general (union)
pattern. Its features are, per stored task, the query's best lexical and best routing cosine similarity to
the task's windows (the top task's similarity, its margin over the second, the routing similarity at the
lexical top task), by window length. A logistic regression on them is fitted on the store's own windows:
each task in turn plays the unseen domain (leave one task out: its windows are the novel examples, scored
against the other tasks), every other window is a known example scored against the store without its own
demo (leave one demo out). The cut is the ``NOVELTY_QUANTILE`` upper quantile of the known examples' scores,
i.e. the share of in-store queries expected to go to the fallback. A store of fewer than three tasks has
too few to leave out: it falls back on a per-task similarity floor (the same quantile of each window's
best similarity to its task's other demos). Nothing is tuned by hand; numbers and every alternative tried
are in BENCHMARKS.md ("Retrieval").

A store mixing this spec with another is refused: the spec id is saved in every pattern.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeprune.errors import IncompatibleError, InvalidArgument

WINDOW_CHARS = (30, 100, 200, 400)
INNER_PER_LENGTH = 2
NOVELTY_QUANTILE = 0.02  # expected share of in-store queries sent to the fallback (the 2-point budget)
# what the stored windows are (checked on every store); "lexical=char1-4" names their text as cut, the lexical
# view fitted on it at retrieval is LexicalFeatures (its name is part of the fitted-classifier cache key)
SPEC_ID = "moeprune.retrieval/2 windows=30,100,200,400 inner=2 routing=first-layer-topk-context lexical=char1-4"
# chosen by leave-demos-out CV of the fused classifier on both benchmark models (BENCHMARKS.md "Retrieval")
LEXICAL_C, ROUTING_C = 100.0, 1.0
# the routing term's weight in the fused log-probability is chosen per store from these, by leave-demos-out
# log-loss on its own windows: a model whose routers do not tell the store's domains apart gets little
ROUTING_WEIGHTS = (0.0, 0.125, 0.25, 0.5, 1.0)
CV_FOLDS = 4


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


def _l2_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def best_per_task(sim_rows: Any, n: int, y: np.ndarray, n_tasks: int, block: int = 1024) -> np.ndarray:
    """``[n, n_tasks]`` row-wise maxima of an ``n``-row similarity matrix over each task's columns (``y``: the
    columns' tasks), computed in row blocks (``sim_rows(lo, hi)`` gives rows ``lo:hi`` densely), so a big
    store never holds ``N x N``; -1 for a task without columns."""
    out = [np.full((0, n_tasks), -1.0)]
    for lo in range(0, n, block):
        S = sim_rows(lo, min(lo + block, n))
        out.append(np.column_stack([S[:, y == t].max(1) if (y == t).any() else np.full(len(S), -1.0)
                                    for t in range(n_tasks)]))
    return np.vstack(out)


# --- fitted-classifier cache -----------------------------------------------------------------
CACHE_FORMAT = "moeprune.window-classifier/2"
CACHE_KEEP = 16  # fitted classifiers kept per cache folder (newest used first)


def fit_key(tasks: Sequence[str], windows: Sequence[Sequence[Any]], params: dict[str, Any]) -> str:
    """Hash of everything a fitted :class:`WindowClassifier` depends on: the spec, the tasks in order, every
    window (demo, text, signature), the parameters and the scikit-learn version that fits it."""
    import sklearn

    h = hashlib.sha256()
    h.update(json.dumps([CACHE_FORMAT, SPEC_ID, sklearn.__version__, list(tasks), params], sort_keys=True).encode())
    for wins in windows:
        h.update(b"\x00task")
        for i, text, sig in wins:
            h.update(json.dumps([int(i), str(text)]).encode())
            h.update(np.asarray(sig, dtype=np.float64).tobytes())
    return h.hexdigest()[:32]


def _lr_arrays(prefix: str, model: Any) -> dict[str, np.ndarray]:
    if model is None:
        return {}
    return {f"{prefix}.coef": model.coef_, f"{prefix}.intercept": model.intercept_,
            f"{prefix}.classes": model.classes_, f"{prefix}.params": np.asarray(json.dumps(model.get_params()))}


def _lr_from(prefix: str, data: Any) -> Any:
    from sklearn.linear_model import LogisticRegression

    if f"{prefix}.coef" not in data:
        return None
    model = LogisticRegression(**json.loads(str(data[f"{prefix}.params"])))
    model.coef_, model.intercept_ = data[f"{prefix}.coef"], data[f"{prefix}.intercept"]
    model.classes_ = data[f"{prefix}.classes"]
    model.n_features_in_ = model.coef_.shape[1]
    return model


def _write_fit(folder: str | Path, key: str, lex: Any, rout: Any, routing_weight: float, auto: np.ndarray,
               novelty_model: tuple[Any, float] | None) -> None:
    """Keep a fitted classifier as plain arrays (``.npz``, no pickle), written atomically; a folder that
    cannot be written (a read-only store) only costs the refit next time."""
    from moeprune.io.atomic import atomic_path

    arrays = {"format": np.asarray(CACHE_FORMAT), "auto": auto, "routing_weight": np.asarray(routing_weight),
              **_lr_arrays("lex", lex), **_lr_arrays("rout", rout)}
    if novelty_model is not None:
        arrays.update(_lr_arrays("novelty", novelty_model[0]))
        arrays["novelty.cut"] = np.asarray(novelty_model[1])
    folder = Path(folder)
    try:
        with atomic_path(folder / f"{key}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        for old in sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)[CACHE_KEEP:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def _read_fit(folder: str | Path, key: str) -> tuple[Any, Any, float, np.ndarray, tuple[Any, float] | None] | None:
    """The fitted parts kept under ``key`` in ``folder``; None when absent. A damaged file is named in a
    warning and refitted."""
    path = Path(folder) / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["format"]) != CACHE_FORMAT:
                return None
            novelty_model = None
            if "novelty.cut" in data:
                novelty_model = (_lr_from("novelty", data), float(data["novelty.cut"]))
            fitted = (_lr_from("lex", data), _lr_from("rout", data), float(data["routing_weight"]), data["auto"],
                      novelty_model)
    except Exception as exc:  # a truncated or foreign file: refit rather than fail the retrieval
        warnings.warn(f"ignoring the damaged fitted-classifier cache {path} ({type(exc).__name__}: {exc}); refitting",
                      stacklevel=3)
        return None
    try:
        os.utime(path)  # newest used: kept longest
    except OSError:
        pass
    return fitted


@dataclass
class Decision:
    task_index: int
    proba: np.ndarray
    similarity: float  # best lexical cosine similarity to the chosen task's windows
    threshold: float  # the similarity floor (fixed, or the small-store auto one); -inf under the learned detector
    novelty: float | None = None  # learned detector: score minus its cut (> 0: no stored task fits)

    @property
    def novel(self) -> bool:
        return self.novelty > 0 if self.novelty is not None else self.similarity < self.threshold


def text_shape(text: str) -> str:
    """``text`` with each upper-case letter written ``A``, other letters ``a``, digits ``0``; punctuation and
    white space kept. Its n-grams see a text's layout (comment prefixes, indentation, markup) apart from
    its words: a licence inside a C comment (``\n * Aaaaaaaa``) is not a licence file."""
    return "".join("A" if c.isupper() else "a" if c.isalpha() else "0" if c.isdigit() else c for c in text)


class LexicalFeatures:
    """The lexical view of a text: character 1-4-gram TF-IDF of the text joined with character 1-5-gram
    TF-IDF of its :func:`text_shape` (sublinear term frequency, both weighted alike), rows l2-normalised,
    so that dot products are cosine similarities. Chosen by leave-demos-out CV on both benchmark models
    (BENCHMARKS.md "Retrieval: lexical shape, fusion weight and the proxy testbed"); the stored windows are
    plain text, so it is fitted at retrieval."""

    NAME = "char1-4+shape1-5"

    def __init__(self) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        def tfidf(hi: int) -> TfidfVectorizer:
            return TfidfVectorizer(analyzer="char", ngram_range=(1, hi), sublinear_tf=True, lowercase=False,
                                   dtype=np.float64)
        self.raw, self.shape = tfidf(4), tfidf(5)

    def _join(self, raw: Any, shape: Any) -> Any:
        from scipy.sparse import hstack
        from sklearn.preprocessing import normalize

        return normalize(hstack([raw, shape]).tocsr())

    def fit_transform(self, texts: Sequence[str]) -> Any:
        return self._join(self.raw.fit_transform(texts), self.shape.fit_transform([text_shape(t) for t in texts]))

    def transform(self, texts: Sequence[str]) -> Any:
        return self._join(self.raw.transform(texts), self.shape.transform([text_shape(t) for t in texts]))


class WindowClassifier:
    """Fused routing + lexical classifier over the stored windows of several tasks.

    ``cache_dir``: where fitted classifiers are kept (:func:`fit_key`); a classifier whose exact inputs were
    fitted before is read from there instead of refitted. ``routing_weight``: the routing term's weight in the
    fused log-probability (None: chosen from ``ROUTING_WEIGHTS`` by leave-demos-out log-loss)."""

    def __init__(self, tasks: Sequence[str], windows: Sequence[Sequence[tuple[int, str, Sequence[float]]]],
                 lexical: bool = True, routing: bool = True, lexical_c: float = LEXICAL_C,
                 routing_c: float = ROUTING_C, quantile: float = NOVELTY_QUANTILE,
                 lengths: Sequence[int] = WINDOW_CHARS, novelty: str = "learned",
                 cache_dir: str | Path | None = None, routing_weight: float | None = None):
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
        if novelty not in ("learned", "floor"):
            raise InvalidArgument(f"novelty rule {novelty!r} is neither 'learned' nor 'floor'")
        single = len(self.tasks) == 1
        self.tfidf = LexicalFeatures()
        self.X_lex = self.tfidf.fit_transform(texts)
        X_r = _sqrt_rows(np.asarray(sigs, dtype=np.float64))
        self.R = _l2_rows(X_r)
        self.quantile = quantile
        self.cache_hit = False
        params = {"lexical": lexical, "lexical_view": LexicalFeatures.NAME, "routing": routing,
                  "lexical_c": lexical_c, "routing_c": routing_c, "quantile": quantile,
                  "lengths": [float(n) for n in self.lengths], "novelty": novelty, "routing_weight": routing_weight}
        self.key = fit_key(self.tasks, windows, params)
        cached = _read_fit(cache_dir, self.key) if cache_dir is not None else None
        if cached is not None:
            self.lex, self.rout, self.routing_weight, self.auto, self.novelty_model = cached
            self.cache_hit = True
            return
        self.lex = (None if single or not lexical
                    else LogisticRegression(C=lexical_c, max_iter=3000).fit(self.X_lex, self.y))
        self.rout = None if single or not routing else LogisticRegression(C=routing_c, max_iter=3000).fit(X_r, self.y)
        self.routing_weight = (routing_weight if routing_weight is not None
                               else self._fit_routing_weight(X_r, lexical_c, routing_c)
                               if self.lex is not None and self.rout is not None else 1.0)
        self.auto = self._loo_thresholds()
        self.novelty_model = self._fit_novelty() if novelty == "learned" and len(self.tasks) >= 3 else None
        if cache_dir is not None:
            _write_fit(cache_dir, self.key, self.lex, self.rout, self.routing_weight, self.auto, self.novelty_model)

    # --- fusion -----------------------------------------------------------------------
    def folds(self, n_folds: int = CV_FOLDS) -> np.ndarray:
        """Each window's leave-demos-out fold: a task's demos are dealt round robin over ``n_folds``."""
        fold = np.zeros(len(self.y), dtype=int)
        for t in range(len(self.tasks)):
            mine = self.y == t
            rank = {d: k for k, d in enumerate(sorted(set(self.demo[mine].tolist())))}
            fold[mine] = [rank[d] % n_folds for d in self.demo[mine].tolist()]
        return fold

    def _fit_routing_weight(self, X_r: np.ndarray, lexical_c: float, routing_c: float) -> float:
        """The routing term's weight (of ``ROUTING_WEIGHTS``) whose fused probabilities have the lowest
        leave-demos-out log-loss on the store's windows; 1 when the store has too few demos to fold."""
        from sklearn.linear_model import LogisticRegression

        def log_proba(X_tr, y_tr, X_te, c):
            model = LogisticRegression(C=c, max_iter=3000).fit(X_tr, y_tr)
            out = np.full((X_te.shape[0], len(self.tasks)), np.log(1e-12))
            out[:, model.classes_] = np.log(np.clip(model.predict_proba(X_te), 1e-12, None))
            return out

        fold = self.folds()
        lex, rout, truth = [], [], []
        for f in range(CV_FOLDS):
            train, test = fold != f, fold == f
            if not test.any() or len(set(self.y[train].tolist())) < 2:
                continue
            lex.append(log_proba(self.X_lex[train], self.y[train], self.X_lex[test], lexical_c))
            rout.append(log_proba(X_r[train], self.y[train], X_r[test], routing_c))
            truth.append(self.y[test])
        if not truth:
            return 1.0
        lex_lp, rout_lp, y = np.vstack(lex), np.vstack(rout), np.concatenate(truth)

        def log_loss(w: float) -> float:
            z = lex_lp + w * rout_lp
            z = z - z.max(1, keepdims=True)
            return float(-np.mean(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1))))
        return min(ROUTING_WEIGHTS, key=log_loss)

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

    def _features(self, lex_best: np.ndarray, rout_best: np.ndarray, n_chars: np.ndarray) -> np.ndarray:
        """Novelty features from per-task best similarities (``[n, tasks]`` each)."""
        n = np.arange(len(lex_best))
        cols = []
        for best, used in ((lex_best, self.use_lexical), (rout_best, self.use_routing)):
            if used:
                top = np.sort(best, 1)
                cols += [top[:, -1], top[:, -1] - top[:, -2]]
        if self.use_lexical and self.use_routing:
            cols.append(rout_best[n, lex_best.argmax(1)])
        X = np.column_stack(cols)
        onehot = np.eye(len(self.lengths))[self._bucket(n_chars)]
        return np.column_stack([X, onehot, X[:, :1] * onehot])

    def novelty_examples(self) -> tuple[np.ndarray, np.ndarray]:
        """The detector's training set from the stored windows: features, and whether each example is novel
        (its task left out of the store) or known (scored without its own demo)."""
        T, y = len(self.tasks), self.y

        def masked(sim):
            def rows(lo, hi):
                S = sim(lo, hi)
                same = (y[lo:hi, None] == y[None, :]) & (self.demo[lo:hi, None] == self.demo[None, :])
                S[same] = -1.0  # leave one demo out
                return S
            return rows

        lex = best_per_task(masked(lambda lo, hi: (self.X_lex[lo:hi] @ self.X_lex.T).toarray()), len(y), y, T)
        rout = best_per_task(masked(lambda lo, hi: self.R[lo:hi] @ self.R.T), len(y), y, T)
        X, novel = [], []
        for u in range(T):  # task u plays the domain the store lacks
            others = np.arange(T) != u
            X.append(self._features(lex[:, others], rout[:, others], self.lens))
            novel.append(y == u)
        return np.vstack(X), np.concatenate(novel)

    def _fit_novelty(self) -> tuple[Any, float]:
        """The learned detector (module docstring): ``(logistic regression, cut)``."""
        from sklearn.linear_model import LogisticRegression

        X, novel = self.novelty_examples()
        model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000).fit(X, novel)
        return model, float(np.quantile(model.decision_function(X[~novel]), 1.0 - self.quantile))

    def novelty(self, texts: Sequence[str], signatures: np.ndarray,
                lexical_sim: np.ndarray | None = None) -> np.ndarray:
        """Learned novelty scores minus the cut (> 0: no stored task fits); stores of >= 3 tasks.
        ``lexical_sim``: the queries' cosine similarities to every stored window, if already computed."""
        if self.novelty_model is None:
            raise InvalidArgument("the learned novelty detector needs a store of at least three tasks")
        T, n = len(self.tasks), len(texts)
        S = (self.tfidf.transform(texts) @ self.X_lex.T).toarray() if lexical_sim is None else lexical_sim
        lex = best_per_task(lambda lo, hi: S[lo:hi], n, self.y, T)
        Rq = _l2_rows(_sqrt_rows(np.atleast_2d(np.asarray(signatures, dtype=np.float64))))
        rout = best_per_task(lambda lo, hi: Rq[lo:hi] @ self.R.T, n, self.y, T)
        model, cut = self.novelty_model
        return model.decision_function(self._features(lex, rout, np.asarray([len(t) for t in texts]))) - cut

    # --- prediction ---------------------------------------------------------------------
    def proba(self, texts: Sequence[str], signatures: np.ndarray) -> np.ndarray:
        n = len(texts)
        if len(self.tasks) == 1:
            return np.ones((n, 1))
        logp = np.zeros((n, len(self.tasks)))
        if self.lex is not None:
            logp += np.log(np.clip(self.lex.predict_proba(self.tfidf.transform(texts)), 1e-12, None))
        if self.rout is not None:
            logp += self.routing_weight * np.log(np.clip(self.rout.predict_proba(_sqrt_rows(np.atleast_2d(signatures))),
                                                         1e-12, None))
        logp -= logp.max(1, keepdims=True)
        p = np.exp(logp)
        return p / p.sum(1, keepdims=True)

    def decide(self, texts: Sequence[str], signatures: np.ndarray,
               threshold: float | str | None = "auto") -> list[Decision]:
        """Per query, the chosen task, its probabilities, its lexical similarity and the novelty rule
        (``"auto"``: learned from the demos, see the module docstring; a number: a fixed minimum lexical
        similarity; None: no fallback)."""
        p = self.proba(texts, signatures)
        choice = p.argmax(1)
        S = (self.tfidf.transform(texts) @ self.X_lex.T).toarray()  # cosine similarities (rows are l2-normed)
        buckets = self._bucket(np.asarray([len(t) for t in texts]))
        learned = self.novelty(texts, signatures, S) if threshold == "auto" and self.novelty_model else None
        out = []
        for q, t in enumerate(choice):
            sim = float(S[q, self.y == t].max())
            if learned is not None:
                out.append(Decision(int(t), p[q], sim, -np.inf, float(learned[q])))
                continue
            th = (float(self.auto[t, buckets[q]]) if threshold == "auto"
                  else -np.inf if threshold is None else float(threshold))
            out.append(Decision(int(t), p[q], sim, th))
        return out
