#!/usr/bin/env python
"""Build the fine-grained benchmark model and its domain data under ``profiles/finegrained/``.

A second benchmark model, unlike the embedded one in every way that matters for pruning and retrieval:
a ``Qwen2MoeForCausalLM`` (DeepSeek/Qwen-style fine-grained MoE: 64 routed experts per layer, top-6, one
gated shared expert) trained on six domains of *real* text (C headers, Perl modules, Debian changelogs,
Debian copyright files, roff manual pages, Markdown/reST docs) extracted from a Debian machine by
``scripts/finegrained_corpus.py`` and committed under ``profiles/finegrained/corpus`` -- this script reads
only that corpus, so it needs nothing from the host.

The recipe is ``scripts/make_embedded.py``'s, reused by import: byte-level BPE tokenizer with the same
special tokens and chat template, packing of same-domain documents into rows, AdamW with warm-up and
cosine decay, the load-balancing loss plus the expert-specialisation (mutual information) loss, and the
same report (per-domain perplexity, usage, and most- vs least-used half masking).

Held-out documents (from source files never trained on) become, per domain, ``demos`` (profiling),
``eval`` (perplexity) and ``heldout`` (retrieval benchmark documents); ``queries`` are instruction-wrapped
openings of further held-out documents. Deterministic (fixed seeds, 2 threads). Usage (from the
repository root, about 16 minutes on 2 busy CPU cores)::

    python scripts/make_finegrained.py [--out profiles/finegrained] [--steps N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_embedded as base
import torch

SEED = 4321
ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "fine-moe"
VOCAB_SIZE = 2048
N_DEMOS, N_EVAL, N_HELDOUT, N_QUERIES = 28, 32, 80, 40
QUERY_TEMPLATES = [  # instruction wrappers for the queries file (the retrieval benchmark adds its own)
    "{x}", "{x}", "Explain what this does:\n{x}", "Can you fix this?\n\n{x}", "Summarise the following.\n{x}",
    "What is wrong here?\n{x}", "{x}\n\nPlease continue.",
]


def read_corpus(corpus: Path, domain: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"train": [], "heldout": []}
    with gzip.open(corpus / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out[rec["split"]].append(rec["text"])
    return out


def build_model(tokenizer, layers: int, hidden: int):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         moe_intermediate_size=32, shared_expert_intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, num_experts=64,
                         num_experts_per_tok=6, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                         max_position_embeddings=base.SEQ_LEN, tie_word_embeddings=False,
                         router_aux_loss_coef=0.01, output_router_logits=False, rms_norm_eps=1e-5,
                         use_sliding_window=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         initializer_range=0.02)
    torch.manual_seed(SEED)
    return Qwen2MoeForCausalLM(cfg)


def fit_tokens(texts: list[str], tokenizer, lo: int = 40, hi: int = base.SEQ_LEN - 8) -> list[str]:
    """Each text cut to its longest whole-line prefix of at most ``hi`` tokens; those under ``lo`` dropped."""
    out = []
    for t in texts:
        lines = t.split("\n")
        while len(lines) > 1 and len(tokenizer(t)["input_ids"]) > hi:
            lines = lines[:-1]
            t = "\n".join(lines)
        n = len(tokenizer(t)["input_ids"])
        if lo <= n <= hi and len(t) >= 200:
            out.append(t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "profiles" / "finegrained")
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--spec-coef", type=float, default=0.1, help="weight of the expert-specialisation loss")
    ap.add_argument("--target-experts", type=float, default=24.0,
                    help="experts per layer each domain should spread over (specialisation loss)")
    ap.add_argument("--report-only", action="store_true", help="only report on an already built --out folder")
    args = ap.parse_args(argv)
    base.setup_determinism()
    torch.manual_seed(SEED)
    corpus = args.out / "corpus"
    descriptions = json.loads((corpus / "descriptions.json").read_text())
    base.DOMAINS = descriptions  # the shared report iterates base.DOMAINS
    model_dir = args.out / "models" / MODEL_NAME
    if args.report_only:
        return base.report_saved(args.out, MODEL_NAME)
    start = time.time()
    model_dir.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file():
            f.unlink()
    data = {d: read_corpus(corpus, d) for d in descriptions}
    base.VOCAB_SIZE = VOCAB_SIZE
    print("training tokenizer ...", flush=True)
    tokenizer = base.train_tokenizer([t for d in descriptions for t in data[d]["train"]], model_dir)

    demos, evals, heldout, queries = {}, {}, {}, {}
    for i, d in enumerate(descriptions):
        rng = random.Random(SEED * 10 + i)
        pool = fit_tokens(data[d]["heldout"], tokenizer)
        rng.shuffle(pool)
        need = N_DEMOS + N_EVAL + N_HELDOUT
        if len(pool) < need:
            raise SystemExit(f"{d}: only {len(pool)} held-out documents fit {base.SEQ_LEN} tokens, need {need}")
        demos[d] = [{"text": t} for t in pool[:N_DEMOS]]
        evals[d] = [{"text": t} for t in pool[N_DEMOS:N_DEMOS + N_EVAL]]
        heldout[d] = [{"text": t} for t in pool[N_DEMOS + N_EVAL:need]]
        rest = pool[need:] or pool[N_DEMOS + N_EVAL:need]
        queries[d] = [{"text": rng.choice(QUERY_TEMPLATES).format(x=rest[j % len(rest)][: rng.choice([120, 200, 300])])}
                      for j in range(N_QUERIES)]

    rng = random.Random(SEED)
    packed = [base.pack_rows([tokenizer(t)["input_ids"] for t in data[d]["train"]], tokenizer.eos_token_id,
                             tokenizer.pad_token_id, rng) for d in descriptions]
    rows = torch.cat(packed)
    n_tok = int((rows != tokenizer.pad_token_id).sum())
    print(f"  {sum(len(data[d]['train']) for d in descriptions)} training documents, {n_tok} tokens in "
          f"{len(rows)} rows of {base.SEQ_LEN}; vocab {len(tokenizer)}  [{time.time() - start:.0f}s]", flush=True)

    model = build_model(tokenizer, args.layers, args.hidden)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training Qwen2MoeForCausalLM ({n_params / 1e6:.2f}M parameters, 64 experts top-6 + shared) for "
          f"{args.steps} steps of {args.batch}x{base.SEQ_LEN} tokens ...", flush=True)
    base.train(model, rows, args.steps, args.batch, args.lr, tokenizer.pad_token_id, args.spec_coef,
               args.target_experts)

    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, k, getattr(tokenizer, k))
    model.save_pretrained(model_dir, max_shard_size="4MB")
    tokenizer.save_pretrained(model_dir)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    print(f"saved {model_dir} ({size / 2**20:.1f} MiB of safetensors)  [{time.time() - start:.0f}s]", flush=True)

    (args.out / "domains.json").write_text(json.dumps(descriptions, indent=2) + "\n")
    for d in descriptions:
        for kind, recs in (("demos", demos), ("eval", evals), ("heldout", heldout), ("queries", queries)):
            base.write_jsonl(args.out / kind / f"{d}.jsonl", recs[d])
    base.report(model, tokenizer, demos, evals)
    print(f"\ndone in {time.time() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
