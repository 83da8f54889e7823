"""vLLM vs transformers on moeprune's uniform float exports: greedy tokens must be equal.

Three steps, run by ``scripts/check_vllm.sh``:

* ``prepare DIR`` (moeprune's venv): builds the exports into DIR -- the embedded model pruned to
  keep 0.5 (frequency, its ``code`` demos) and tiny random Mixtral, Qwen3-MoE, OLMoE and DeepSeek-V3
  (Hub routing: ``topk_method="noaux_tc"``, ``scoring_func="sigmoid"``, grouped top-k) pruned to
  keep 0.5 -- and writes ``DIR/expected.json``: plain transformers' greedy tokens and their log-probs.
* ``generate DIR NAME`` (the vLLM venv, once per model): vLLM's greedy tokens (``enforce_eager``, float32) for the same
  prompts, into ``DIR/vllm.json``.
* ``compare DIR``: a table per model; exit 1 when an export's tokens differ (see :func:`compare`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NEW_TOKENS = 16
# vLLM's CPU attention takes head sizes 32, 64, 80, ... (not the test models' 8) and its CPU MLA kernel only
# DeepSeek's latent size kv_lora_rank + qk_rope_head_dim = 512 + 64: the tiny models use those sizes
_ATTN = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
TINY = {  # family -> config overrides (DeepSeek-V3 as its Hub config routes: noaux_tc, sigmoid, groups)
    "mixtral": _ATTN,
    "qwen3_moe": {**_ATTN, "head_dim": 32},
    "olmoe": _ATTN,
    "deepseek_v3": {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 512,
                    "qk_rope_head_dim": 64, "qk_nope_head_dim": 32, "v_head_dim": 32, "q_lora_rank": 64,
                    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
                    "routed_scaling_factor": 2.5},
}


def prepare(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from moeprune import embedded
    from moeprune.pipeline import prune
    from tests.tiny_models import make_model, save_model, write_token_demos

    out.mkdir(parents=True, exist_ok=True)
    jobs = {"embedded": (embedded.model_dir(), embedded.demo_file("code"))}
    for family, extra in TINY.items():
        src = out / "src" / family
        if not src.exists():
            save_model(make_model(family, seed=1, **extra), src, shard_size="200KB")
        jobs[family] = (src, write_token_demos(out / f"{family}-demos.jsonl", n=8, length=24, seed=2))
    expected = {}
    for name, (src, demos) in [*jobs.items(), *((f"{f}:source", (out / "src" / f, None)) for f in TINY)]:
        export = out / "exports" / name if demos is not None else src  # sources: is a mismatch moeprune's?
        if demos is not None:
            prune(src, demos, "frequency", "0.5", export, overwrite=True, progress=False, dtype="float32")
        model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(3)
        vocab = model.config.vocab_size
        prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 9, 17)]
        rows = []
        for ids in prompts:
            with torch.no_grad():
                gen = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                     min_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True,
                                     pad_token_id=0)
            tokens = gen.sequences[0, len(ids):].tolist()
            logprobs = [torch.log_softmax(s[0].double(), -1) for s in gen.logits]  # raw: before min_new_tokens
            top2 = [lp.topk(2).values.tolist() for lp in logprobs]
            rows.append({"prompt": ids, "tokens": tokens, "logprobs": [float(lp[t]) for lp, t in zip(logprobs, tokens)],
                         "margin": [a - b for a, b in top2]})
        expected[name] = {"path": str(export), "rows": rows}
        print(f"prepared {name}: {export}", flush=True)
    (out / "expected.json").write_text(json.dumps(expected, indent=1))


def generate(out: Path, only: str) -> None:
    """vLLM's tokens for model ``only`` (one process per model: a failed engine leaves vLLM's process state
    unusable for the next one), merged into ``vllm.json``."""
    from vllm import LLM, SamplingParams

    expected = json.loads((out / "expected.json").read_text())
    path = out / "vllm.json"
    got = json.loads(path.read_text()) if path.exists() else {}
    for name, job in expected.items():
        if name != only:
            continue
        try:
            llm = LLM(model=job["path"], enforce_eager=True, dtype="float32", skip_tokenizer_init=True,
                      max_model_len=128, seed=0)
            params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, logprobs=1,
                                    detokenize=False)
            outs = llm.generate([{"prompt_token_ids": r["prompt"]} for r in job["rows"]], params, use_tqdm=False)
            rows = []
            for o in outs:
                c = o.outputs[0]
                rows.append({"tokens": list(c.token_ids),
                             "logprobs": [float(lp[t].logprob) for lp, t in zip(c.logprobs, c.token_ids)]})
            got[name] = {"rows": rows}
            del llm
        except Exception as exc:  # noqa: BLE001 -- one model failing to load is a finding, not the end of the check
            got[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(f"vllm {name}: {'error' if 'error' in got[name] else 'ok'}", flush=True)
        path.write_text(json.dumps(got, indent=1))


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _max_diff(rows: list[dict], mine: list[dict]) -> float:
    """Largest |log-prob difference| over the tokens both engines generated alike (and the first that differs)."""
    return max((abs(a["logprobs"][j] - b["logprobs"][j]) for a, b in zip(rows, mine)
                for j in range(min(_common(a["tokens"], b["tokens"]) + 1, len(a["tokens"])))), default=float("nan"))


def compare(out: Path) -> int:
    """Exit status 1 when an export's tokens differ, unless every difference is a near-tie that the engines'
    disagreement on the *unpruned source* already explains (transformers' margin there below the largest
    log-prob difference vLLM and transformers show on the source): then a WARNING with the numbers."""
    expected = json.loads((out / "expected.json").read_text())
    got = json.loads((out / "vllm.json").read_text())
    failed = 0
    lines, notes = [], []
    for name, job in expected.items():
        mine = got.get(name, {"error": "not run"})
        if "error" in mine:  # an export vLLM cannot load fails, unless vLLM cannot load its unpruned source either
            source_failed = "error" in got.get(f"{name}:source", {"error": "not run"})
            if not name.endswith(":source") and source_failed:
                notes.append(f"WARNING {name}: vLLM fails on the unpruned source too: vLLM or this machine, "
                             "not moeprune's export")
            failed += not name.endswith(":source") and not source_failed
            lines.append((name, "vLLM FAILED", " | ".join(mine["error"].splitlines()[:3])[:400]))
            continue
        rows, vrows = job["rows"], mine["rows"]
        same = sum(a["tokens"] == b["tokens"] for a, b in zip(rows, vrows))
        verdict = f"{same}/{len(rows)} equal"
        if same < len(rows) and not name.endswith(":source"):
            src = f"{name}:source"
            noise = _max_diff(expected[src]["rows"], got[src]["rows"]) if "rows" in got.get(src, {}) else None
            margins = []
            for a, b in zip(rows, vrows):
                if a["tokens"] != b["tokens"]:
                    i = _common(a["tokens"], b["tokens"])
                    margins.append(a["margin"][i])
                    notes.append(f"{name}: first difference at new token {i}: transformers {a['tokens'][i]} (its "
                                 f"margin over the runner-up {a['margin'][i]:.2e}), vLLM {b['tokens'][i]}")
            if noise is not None and max(margins) < noise:
                verdict += " (near-tie)"
                notes.append(f"WARNING {name}: every difference is a near-tie smaller than the {noise:.2e} log-prob "
                             f"difference vLLM and transformers show on the unpruned source ({src}): the engines "
                             "disagree on this model itself, not on moeprune's export")
            else:
                failed += 1
                verdict += " MISMATCH"
        lines.append((name, verdict, f"{_max_diff(rows, vrows):.2e}"))
    print(f"{'model':<20} {'greedy tokens':<24} max |logprob diff| (common prefix)")
    for name, verdict, diff in lines:
        print(f"{name:<20} {verdict:<24} {diff}")
    for note in notes:
        print(note)
    return 1 if failed else 0


if __name__ == "__main__":
    step, folder = sys.argv[1], Path(sys.argv[2])
    if step == "prepare":
        prepare(folder)
    elif step == "generate":
        generate(folder, sys.argv[3])
    elif step == "names":
        print(" ".join(json.loads((folder / "expected.json").read_text())))
    elif step == "compare":
        sys.exit(compare(folder))
    else:
        sys.exit(f"unknown step {step!r}: prepare, generate or compare")
