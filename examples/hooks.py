"""The task-adaptive runtime's hooks, as a serving engine calls them (`moeprune serve` uses the same).

    python examples/hooks.py MODEL --store STORE --query "Solve 3x + 5 = 20"

``retrieve`` picks the query's task pattern, ``activate`` loads its experts (reading only those
neither active nor cached), ``expert_map`` says which original experts are loaded where (an engine
with its own expert table masks the absent ones, -1), and ``using`` holds the runtime's lock with a
pattern active, so a forward pass never sees another thread's half-done switch.
"""

from __future__ import annotations

import argparse

import torch

from moeprune import TaskAdaptiveModel


def route_and_run(runtime: TaskAdaptiveModel, query: str) -> dict:
    """Retrieve the query's task, switch to it, and take the greedy next token under the lock."""
    match = runtime.retrieve(query)                 # task, distance, pattern
    switch = runtime.activate(match.pattern)        # what the switch read: experts, bytes, cache hits
    loaded = {layer: sum(i >= 0 for i in ids) for layer, ids in runtime.expert_map().items()}
    with runtime.using(match.pattern) as model:     # switch + forward as one step
        ids = torch.tensor([runtime.tokenizer(query)["input_ids"]])
        next_id = int(model(ids).logits[0, -1].argmax())
    return {"task": match.task, "distance": match.distance, "switch": switch, "experts_loaded": loaded,
            "next_token": runtime.tokenizer.decode([next_id])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--store", required=True)
    ap.add_argument("--query", required=True)
    args = ap.parse_args()
    print(route_and_run(TaskAdaptiveModel(args.model, store=args.store), args.query))


if __name__ == "__main__":
    main()
