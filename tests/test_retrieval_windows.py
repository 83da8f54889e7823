"""Retrieval signature spec 2 (moeprune.patterns.windows): demo windows, the fused classifier, novelty, spec refusal."""

import copy
import json

import numpy as np
import pytest
import torch

from moeprune import embedded
from moeprune.demos import encode_demos, read_demos
from moeprune.patterns.retrieval import GENERAL_TASK, Retriever, attach_windows, query_signatures, window_data
from moeprune.patterns.windows import (
    INNER_PER_LENGTH,
    SPEC_ID,
    WINDOW_CHARS,
    SignatureSpecError,
    cut_windows,
)


@pytest.fixture(scope="module")
def emb():
    from moeprune.fingerprint import checkpoint_fingerprint
    from moeprune.io.checkpoint import open_checkpoint
    from moeprune.loader.selective import load_model

    torch.manual_seed(0)
    ckpt = open_checkpoint(embedded.model_dir())
    model, tok = load_model(ckpt, "cpu", "float32")
    return model, tok, checkpoint_fingerprint(ckpt)


@pytest.fixture(scope="module")
def patterns(emb):
    """One pattern per embedded domain, windows from its first 10 demos (tcess, keep 0.5)."""
    from moeprune.pipeline import select_pattern
    from moeprune.profiling.profile import profile_model

    model, tok, fp = emb
    out = {}
    for d in embedded.domains():
        recs = read_demos(embedded.demo_file(d))[:10]
        prof = profile_model(model, encode_demos(recs, tok), fp, task=d, progress=False)
        out[d] = attach_windows(select_pattern(prof, "tcess", "0.5"), model, tok, recs)
    return out


def _eval_openings(domain, n=200):
    return [r["text"][:n] for r in read_demos(embedded.demo_file(domain, "eval"))]


def test_cut_windows_are_query_length_openings_and_inner_windows():
    text = "\n".join(f"line {i}: " + "word " * 12 for i in range(30))
    wins = cut_windows(text)
    assert wins == cut_windows(text)  # deterministic
    assert len(wins) == len(set(wins)) == len(WINDOW_CHARS) * (1 + INNER_PER_LENGTH)
    for n in WINDOW_CHARS:
        assert text[:n].strip() in wins
    assert all(len(w) <= max(WINDOW_CHARS) for w in wins)
    assert cut_windows("short text") == ["short text"] and cut_windows("  \n ") == []


def test_stored_window_signatures_are_query_signatures(emb, patterns):
    """A window's stored signature is exactly the signature a query of that text gets (so stored
    signatures look like queries), and making the windows is deterministic."""
    model, tok, _ = emb
    data = patterns["math"].meta["retrieval"]
    assert data["spec"] == SPEC_ID
    wins = data["windows"][:12]
    sig = query_signatures(model, encode_demos([{"text": w} for _, w, _ in wins], tok), "first")
    np.testing.assert_allclose(np.asarray([s for _, _, s in wins]), sig, atol=1e-5)
    again = window_data(model, tok, read_demos(embedded.demo_file("math"))[:10])
    assert again == data


def test_uniform_signature_is_additive_over_tokens(emb):
    """With uniform weights a signature is the mean of per-token top-k indicators, and a causal model routes
    a prefix the same whatever follows: n * sig(ids[:n]) - (n-1) * sig(ids[:n-1]) is token n's indicator
    (exactly top-k ones, the rest zeros)."""
    model, tok, fp = emb
    ids = encode_demos([{"text": "Solve for x: 3x + 4 = 19. Subtract 4 from both sides."}], tok)[0]
    def sig(n):
        return query_signatures(model, [ids[:n]], "first", weighting="uniform", ignore_ids=[])[0]
    for n in range(2, len(ids) + 1):
        token = n * sig(n) - (n - 1) * sig(n - 1)
        np.testing.assert_allclose(np.sort(token)[::-1][: fp.top_k + 1], [1.0] * fp.top_k + [0.0], atol=1e-9)
        assert np.all(np.isclose(token, 0.0, atol=1e-9) | np.isclose(token, 1.0, atol=1e-9))


def test_retrieval_in_store_and_fallback_out_of_store(patterns):
    """Held-out openings go to their task; a domain the store lacks goes mostly to the general pattern,
    at little in-store cost."""
    from moeprune.loader.selective import load_signature_model

    net, tok, _ = load_signature_model(embedded.model_dir())
    inside = [patterns[d] for d in ("math", "code", "legal")]
    r = Retriever(inside)
    assert r.windowed
    texts = {d: _eval_openings(d) for d in ("math", "code", "legal", "recipes")}
    sig = {d: query_signatures(net, encode_demos([{"text": t} for t in v], tok), "first") for d, v in texts.items()}
    hits = [m.task == d for d in ("math", "code", "legal") for m in r.match(sig[d], texts[d])]
    assert np.mean(hits) >= 0.9
    out = r.match(sig["recipes"], texts["recipes"])
    assert np.mean([m.task == GENERAL_TASK for m in out]) >= 0.8
    assert all(m.pattern.task == GENERAL_TASK for m in out if m.task == GENERAL_TASK)
    # no fallback: None, or a distance no query can exceed
    for threshold in (None, 1.0):
        matches = Retriever(inside, threshold=threshold).match(sig["recipes"], texts["recipes"])
        assert GENERAL_TASK not in {m.task for m in matches}
    assert Retriever(inside).match(sig["math"], texts["math"])[0].task == r.match(sig["math"], texts["math"])[0].task
    with pytest.raises(ValueError, match="needs each query's text"):
        r.match(sig["math"])


def test_store_round_trip_keeps_windows_and_refuses_other_specs(patterns, tmp_path):
    from moeprune.patterns.store import PatternStore

    store = PatternStore(tmp_path / "s")
    for p in patterns.values():
        store.add(copy.deepcopy(p))
    back = {p.task: p for p in store.patterns()}
    assert {t: p.meta["retrieval"] for t, p in back.items()} == {t: p.meta["retrieval"] for t, p in patterns.items()}
    assert Retriever(list(back.values())).windowed
    other = copy.deepcopy(patterns["code"])
    other.meta["retrieval"]["spec"] = "moeprune.retrieval/1 something else"
    with pytest.raises(SignatureSpecError, match="'code' was made with signature spec.*store add"):
        Retriever([patterns["math"], other])
    legacy = copy.deepcopy(patterns["code"])
    del legacy.meta["retrieval"]
    with pytest.raises(SignatureSpecError, match="no demo windows"):
        Retriever([patterns["math"], legacy])
    centroid = [copy.deepcopy(p) for p in patterns.values()]
    for p in centroid:
        del p.meta["retrieval"]
    assert not Retriever(centroid).windowed  # profile signatures only: the nearest-centroid matcher
    with pytest.raises(ValueError, match="hold no demo windows"):
        Retriever(centroid, method="windows")


def test_cli_store_add_makes_windows_and_retrieve_uses_them(tmp_path, capsys):
    from moeprune.cli import main

    store = tmp_path / "store"
    for d in ("math", "code"):
        demos = tmp_path / f"{d}.jsonl"
        demos.write_text("".join(json.dumps(r) + "\n" for r in read_demos(embedded.demo_file(d))[:6]))
        assert main(["store", "add", str(store), str(embedded.model_dir()), "--demos", str(demos), "--task", d,
                     "--keep", "0.5", "-q"]) == 0
    capsys.readouterr()
    assert main(["retrieve", str(store), "--query", _eval_openings("math")[0], "--query", _eval_openings("code")[0],
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [m["task"] for m in out] == ["math", "code"] and all(m["threshold"] is not None for m in out)
    assert main(["retrieve", str(store), "--query", "x", "--threshold", "banana"]) == 2


def _windows(patterns, tasks):
    return [patterns[t].meta["retrieval"]["windows"] for t in tasks]


def test_learned_novelty_is_fitted_from_the_store_alone(patterns):
    """The learned detector: deterministic; its cut flags the chosen share of the known (leave-one-demo-out)
    examples it was fitted on; a direct recomputation of one query's features gives its score; a store of
    two tasks falls back on the similarity floor; an unknown rule is refused."""
    from moeprune.patterns.windows import WindowClassifier, _l2_rows, _sqrt_rows

    tasks = ["math", "code", "legal"]
    a = WindowClassifier(tasks, _windows(patterns, tasks))
    b = WindowClassifier(tasks, _windows(patterns, tasks))
    texts = _eval_openings("recipes")[:5] + _eval_openings("math")[:5]
    net_sigs = np.asarray([w[2] for w in patterns["math"].meta["retrieval"]["windows"][:10]])
    np.testing.assert_array_equal(a.novelty(texts, net_sigs), b.novelty(texts, net_sigs))
    # the features of one query, recomputed by hand: per task, the best cosine similarity to its windows
    q, s = texts[0], net_sigs[0]
    lex = [(a.tfidf.transform([q]) @ a.X_lex[a.y == t].T).toarray().max() for t in range(3)]
    r = _l2_rows(_sqrt_rows(s[None].astype(float)))[0]
    rout = [(a.R[a.y == t] @ r).max() for t in range(3)]
    lo, ro = np.sort(lex), np.sort(rout)
    x = [lo[-1], lo[-1] - lo[-2], ro[-1], ro[-1] - ro[-2], rout[int(np.argmax(lex))]]
    onehot = np.eye(len(WINDOW_CHARS))[a._bucket(np.asarray([len(q)]))[0]]
    feats = np.concatenate([x, onehot, x[0] * onehot])
    model, cut = a.novelty_model
    assert a.novelty([q], s[None])[0] == pytest.approx(float(model.decision_function(feats[None])[0] - cut), abs=1e-9)
    # the cut: `quantile` of the known examples (each scored without its own demo) lie above it
    X, novel = a.novelty_examples()
    assert novel.sum() == len(a.y) and (~novel).sum() == 2 * len(a.y)  # each window: once novel, twice known
    above = (model.decision_function(X[~novel]) > cut).mean()
    assert abs(above - a.quantile) <= 2.0 / (~novel).sum()
    two = WindowClassifier(tasks[:2], _windows(patterns, tasks[:2]))
    assert two.novelty_model is None
    dec = two.decide(texts[:2], net_sigs[:2])
    assert all(d.novelty is None and np.isfinite(d.threshold) for d in dec)
    floor = WindowClassifier(tasks, _windows(patterns, tasks), novelty="floor")
    assert floor.novelty_model is None and all(d.novelty is None for d in floor.decide(texts, net_sigs))
    with pytest.raises(ValueError, match="novelty rule 'magic'"):
        WindowClassifier(tasks, _windows(patterns, tasks), novelty="magic")


def test_fitted_classifier_cache_is_exact_keyed_by_content_and_survives_damage(patterns, tmp_path):
    """A classifier read from the cache decides exactly as a fresh fit; any change to the windows or the
    parameters misses it; a damaged file is named and refitted; a folder that cannot be written costs only
    the refit; the file holds plain arrays (no pickle)."""
    from moeprune.patterns.windows import WindowClassifier

    tasks = ["math", "code", "legal"]
    wins = _windows(patterns, tasks)
    cache = tmp_path / "cache"
    fresh = WindowClassifier(tasks, wins, cache_dir=cache)
    files = list(cache.glob("*.npz"))
    assert not fresh.cache_hit and len(files) == 1
    with np.load(files[0], allow_pickle=False) as data:  # loads without pickle
        assert "lex.coef" in data and "novelty.cut" in data
    cached = WindowClassifier(tasks, wins, cache_dir=cache)
    assert cached.cache_hit and cached.key == fresh.key
    texts = _eval_openings("recipes")[:4] + _eval_openings("math")[:4] + _eval_openings("code")[:4]
    sigs = np.asarray([w[2] for w in patterns["math"].meta["retrieval"]["windows"][:12]])
    np.testing.assert_array_equal(cached.proba(texts, sigs), fresh.proba(texts, sigs))
    np.testing.assert_array_equal(cached.novelty(texts, sigs), fresh.novelty(texts, sigs))
    np.testing.assert_array_equal(cached.auto, fresh.auto)
    assert [d.novel for d in cached.decide(texts, sigs)] == [d.novel for d in fresh.decide(texts, sigs)]
    # the key follows the content: one window's signature, the task order, a parameter
    changed = copy.deepcopy(wins)
    i, text, sig = changed[0][0]
    changed[0][0] = (i, text, [v * 0.5 for v in sig])
    assert not WindowClassifier(tasks, changed, cache_dir=cache).cache_hit
    assert not WindowClassifier(tasks[::-1], wins[::-1], cache_dir=cache).cache_hit
    assert not WindowClassifier(tasks, wins, lexical_c=1.0, cache_dir=cache).cache_hit
    assert WindowClassifier(tasks, wins, cache_dir=cache).cache_hit
    # damage: truncated file -> a warning naming it, then a refit equal to the fresh one
    path = cache / f"{fresh.key}.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match=f"damaged fitted-classifier cache .*{fresh.key}"):
        refit = WindowClassifier(tasks, wins, cache_dir=cache)
    assert not refit.cache_hit
    np.testing.assert_array_equal(refit.proba(texts, sigs), fresh.proba(texts, sigs))
    assert WindowClassifier(tasks, wins, cache_dir=cache).cache_hit  # rewritten whole
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    assert not WindowClassifier(tasks, wins, cache_dir=blocked).cache_hit  # unwritable: no error


def test_store_retrieval_reuses_its_fitted_classifier(patterns, tmp_path):
    """``retrieve`` over a store keeps the fitted classifier in the store and the next call reads it."""
    from moeprune.patterns.store import PatternStore
    from moeprune.store_jobs import retrieve

    store = PatternStore(tmp_path / "store")
    for t in ("math", "code", "legal"):
        store.add(copy.deepcopy(patterns[t]))
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"text": t}) + "\n" for t in _eval_openings("code")[:2]))
    first = retrieve(store, queries, model=embedded.model_dir())
    assert len(list(store.classifier_cache.glob("*.npz"))) == 1
    mtime = next(store.classifier_cache.glob("*.npz")).stat().st_mtime_ns
    second = retrieve(store, queries, model=embedded.model_dir())
    assert [m.task for m, _ in first] == [m.task for m, _ in second] == ["code", "code"]
    assert [m.distance for m, _ in first] == [m.distance for m, _ in second]
    assert [p.name for p in store.classifier_cache.glob("*.npz")] == [next(store.classifier_cache.glob("*.npz")).name]
    assert next(store.classifier_cache.glob("*.npz")).stat().st_mtime_ns >= mtime


def test_lexical_view_sees_layout_apart_from_words():
    from sklearn.feature_extraction.text import TfidfVectorizer

    from moeprune.patterns.windows import LexicalFeatures, text_shape

    assert text_shape("Copyright (C) 2024 Ñu\n * bar_9") == "Aaaaaaaaa (A) 0000 Aa\n * aaa_0"
    texts = ["abc def\n# ghi", "xyz uvw\n# rst", "plain words only here"]
    view = LexicalFeatures()
    X = view.fit_transform(texts)
    assert np.allclose(np.asarray(X.multiply(X).sum(1)).ravel(), 1.0)
    assert np.allclose((view.transform(texts) - X).toarray(), 0.0)
    # the first two share their layout and no word: the shape view makes them close, raw characters alone do not
    raw = TfidfVectorizer(analyzer="char", ngram_range=(1, 4), sublinear_tf=True, lowercase=False).fit_transform(texts)
    assert (X[0] @ X[1].T).toarray()[0, 0] > 0.4 > 0.2 > (raw[0] @ raw[1].T).toarray()[0, 0]


def test_routing_weight_is_chosen_by_leave_demos_out_log_loss():
    from sklearn.linear_model import LogisticRegression

    from moeprune.patterns.windows import ROUTING_WEIGHTS, WindowClassifier, _sqrt_rows

    rng = np.random.default_rng(0)
    words = {0: "alpha beta gamma delta", 1: "one two three four", 2: "red green blue cyan"}

    def store(informative_text: bool, informative_routing: bool):
        wins = []
        for t in range(3):
            rows = []
            for demo in range(8):
                for k in range(3):
                    vocab = (words[t] if informative_text else " ".join(words.values())).split()
                    text = " ".join(rng.choice(vocab, 12))
                    sig = rng.dirichlet(np.ones(8))
                    if informative_routing:
                        sig = 0.2 * sig + 0.8 * np.eye(8)[t]
                    rows.append((demo, text, sig))
            wins.append(rows)
        return wins

    noisy_routing = WindowClassifier(["a", "b", "c"], store(True, False), novelty="floor")
    useful = store(False, True)
    clf = WindowClassifier(["a", "b", "c"], useful, novelty="floor")
    assert noisy_routing.routing_weight < clf.routing_weight == max(ROUTING_WEIGHTS)
    # the folds deal each task's demos round robin; the fused probabilities are the weighted product
    assert set(noisy_routing.folds().tolist()) == {0, 1, 2, 3}
    texts, sigs = ["alpha one red"], np.eye(8)[[1]]
    lex = LogisticRegression(C=100.0, max_iter=3000).fit(clf.X_lex, clf.y)
    rout = LogisticRegression(C=1.0, max_iter=3000).fit(_sqrt_rows(np.stack([w[2] for t in useful for w in t])), clf.y)
    z = (np.log(lex.predict_proba(clf.tfidf.transform(texts)))
         + clf.routing_weight * np.log(rout.predict_proba(_sqrt_rows(sigs))))
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert np.allclose(clf.proba(texts, sigs), expected, atol=1e-6)
