#!/usr/bin/env python
"""Build the embedded demo model and its domain data under ``profiles/``.

One deterministic script (fixed seeds, 2 CPU threads, deterministic torch algorithms) that

1. generates four template-based text domains (math, code, legal, recipes) with seeded randomness;
2. trains a byte-level BPE tokenizer on them (``tokenizers``) with ``<|bos|>``, ``<|eos|>``,
   ``<|pad|>`` and chat-role tokens, and a chat template, saved as a ``PreTrainedTokenizerFast``;
3. trains a small ``MixtralForCausalLM`` (16 experts per layer, top-2) with AdamW on the mixture of
   domains, with the standard load-balancing loss and an expert-specialisation (mutual information)
   loss that makes each domain's text concentrate on a few experts per layer (see
   ``specialisation_loss``): this is what makes per-domain pruning of the demo model meaningful;
4. saves it as sharded safetensors in ``profiles/models/tiny-moe``;
5. writes ``profiles/domains.json`` and, per domain, ``profiles/{demos,eval,queries}/<domain>.jsonl``
   (demos, eval texts and queries are drawn with their own seeds and never trained on);
6. reports per-domain perplexity, per-domain expert usage, and the perplexity when the router of
   each domain may only use its most (or only its least) used half of the experts.

Usage (from the repository root, about 10 minutes on 2 CPU cores)::

    python scripts/make_embedded.py [--out profiles] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: no collapse on a busy machine

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

transformers.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()  # no "sequence longer than model_max_length" noise on long training texts

SEED = 1234
DOMAIN_SEEDS = {"train": 1, "demos": 2, "eval": 3, "queries": 4}  # one random stream per split
DOMAINS = {
    "math": "arithmetic and algebra word problems with worked, step-by-step answers",
    "code": "short Python functions: definitions, loops, conditionals, returns, comments and docstrings",
    "legal": "contract clauses: licences, term and termination, payment, confidentiality, liability",
    "recipes": "cooking recipes: ingredients with quantities and numbered preparation steps",
}
SPECIAL = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
VOCAB_SIZE = 1024
SEQ_LEN = 256
MIN_TOKENS, MAX_TOKENS = 60, 200  # length of every demo / eval text in tokens
N_DEMOS, N_EVAL, N_QUERIES = 28, 32, 40
N_TRAIN_DOCS = 6000  # per domain


# --------------------------------------------------------------------------------------------
# shared vocabulary
# --------------------------------------------------------------------------------------------

NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lucas", "Priya", "Omar", "Elena", "Sam", "Chloe", "Ravi", "Nina",
         "Diego", "Hannah", "Yusuf", "Grace", "Mateo", "Sofia", "Ben", "Leila", "Ivan", "Zoe", "Felix", "Amara"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                "twenty", "twenty-one", "twenty-two", "twenty-three", "twenty-four", "twenty-five", "twenty-six",
                "twenty-seven", "twenty-eight", "twenty-nine", "thirty"]


def pick(rng: random.Random, items):
    return items[rng.randrange(len(items))]


# --------------------------------------------------------------------------------------------
# math: word problems with worked answers
# --------------------------------------------------------------------------------------------

ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "coins", "cookies", "stamps", "cards", "shells",
         "oranges", "balloons", "tickets", "beads", "bottles", "eggs"]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("crate", "crates"), ("jar", "jars"), ("packet", "packets"),
              ("basket", "baskets"), ("tray", "trays"), ("shelf", "shelves")]
VEHICLES = ["car", "train", "cyclist", "bus", "boat", "runner", "truck"]
GOODS = [("notebook", "notebooks"), ("pen", "pens"), ("sandwich", "sandwiches"), ("shirt", "shirts"),
         ("ticket", "tickets"), ("plant", "plants"), ("mug", "mugs"), ("lamp", "lamps")]
VARS = ["x", "y", "n", "a", "b", "k", "m", "t"]


def math_add_sub(rng):
    name, other, item = pick(rng, NAMES), pick(rng, NAMES), pick(rng, ITEMS)
    a, b, c = rng.randint(12, 95), rng.randint(5, 60), rng.randint(2, 30)
    c = min(c, a + b - 1)
    q = (f"{name} has {a} {item}. {pick(rng, ['She', 'He'])} "
         f"{pick(rng, ['buys', 'finds', 'is given', 'collects'])} {b} more and then gives {c} to {other}. "
         f"How many {item} does {name} have now?")
    s = f"First add: {a} + {b} = {a + b}. Then subtract: {a + b} - {c} = {a + b - c}. The answer is {a + b - c}."
    return q, s


def math_multiply(rng):
    item, (one, many) = pick(rng, ITEMS), pick(rng, CONTAINERS)
    per, n = rng.randint(3, 24), rng.randint(3, 19)
    q = f"A {one} holds {per} {item}. How many {item} are there in {n} {many}?"
    s = f"Multiply the number of {many} by the {item} in each {one}: {n} * {per} = {n * per}. The answer is {n * per}."
    return q, s


def math_divide(rng):
    item, n = pick(rng, ITEMS), rng.randint(3, 12)
    each = rng.randint(3, 15)
    group = pick(rng, ["children", "friends", "students", "teams", "tables", "classes"])
    q = f"There are {n * each} {item} shared equally among {n} {group}. How many {item} does each of the {group} get?"
    s = f"Divide the total by the number of {group}: {n * each} / {n} = {each}. Each gets {each} {item}."
    return q, s


def math_linear(rng):
    v = pick(rng, VARS)
    a, x, b = rng.randint(2, 9), rng.randint(-6, 15), rng.randint(1, 30)
    c = a * x + b
    q = f"Solve for {v}: {a}{v} + {b} = {c}."
    s = (f"Subtract {b} from both sides: {a}{v} = {c - b}. Divide both sides by {a}: {v} = {x}. "
         f"Check: {a} * {x} + {b} = {c}. So {v} = {x}.")
    return q, s


def math_percent(rng):
    good = pick(rng, GOODS)[0]
    price, pct = rng.randint(2, 40) * 5, pick(rng, [10, 15, 20, 25, 30, 40, 50])
    off = price * pct // 100 if price * pct % 100 == 0 else price * pct / 100
    q = f"A {good} costs ${price} and is on sale for {pct}% off. What is the sale price?"
    s = (f"The discount is {pct}% of {price}, which is {price} * {pct} / 100 = {off}. "
         f"The sale price is {price} - {off} = {price - off}. The answer is ${price - off}.")
    return q, s


def math_rectangle(rng):
    w, h = rng.randint(3, 25), rng.randint(3, 25)
    thing = pick(rng, ["garden", "room", "field", "table top", "poster", "playground", "carpet"])
    unit = pick(rng, ["meters", "feet", "centimeters"])
    if rng.random() < 0.5:
        q = f"A rectangular {thing} is {w} {unit} long and {h} {unit} wide. What is its area?"
        s = f"Area = length * width = {w} * {h} = {w * h}. The area is {w * h} square {unit}."
    else:
        q = f"A rectangular {thing} is {w} {unit} long and {h} {unit} wide. What is its perimeter?"
        s = (f"Perimeter = 2 * (length + width) = 2 * ({w} + {h}) = 2 * {w + h} = {2 * (w + h)}. "
             f"The perimeter is {2 * (w + h)} {unit}.")
    return q, s


def math_speed(rng):
    v, t = rng.randint(4, 90), rng.randint(2, 9)
    veh = pick(rng, VEHICLES)
    if rng.random() < 0.5:
        q = f"A {veh} travels at {v} km per hour for {t} hours. How far does it travel?"
        s = f"Distance = speed * time = {v} * {t} = {v * t}. The {veh} travels {v * t} km."
    else:
        q = f"A {veh} covers {v * t} km in {t} hours. What is its average speed?"
        s = f"Speed = distance / time = {v * t} / {t} = {v}. The average speed is {v} km per hour."
    return q, s


def math_average(rng):
    k = rng.randint(3, 6)
    nums = [rng.randint(40, 100) for _ in range(k)]
    nums[-1] += (-sum(nums)) % k  # make the mean a whole number
    name = pick(rng, NAMES)
    what = pick(rng, ["test scores", "daily steps in hundreds", "weekly sales", "quiz marks"])
    q = f"{name} recorded these {what}: {', '.join(map(str, nums))}. What is the mean?"
    s = (f"Add them: {' + '.join(map(str, nums))} = {sum(nums)}. There are {k} values, so the mean is "
         f"{sum(nums)} / {k} = {sum(nums) // k}.")
    return q, s


def math_shopping(rng):
    name, (_one, many) = pick(rng, NAMES), pick(rng, GOODS)
    n, price = rng.randint(2, 9), rng.randint(2, 15)
    paid = (n * price // 10 + 1) * 10 + pick(rng, [0, 10, 20])
    q = f"{name} buys {n} {many} at ${price} each and pays with ${paid}. How much change does {name} get?"
    s = (f"The cost is {n} * {price} = {n * price}. The change is {paid} - {n * price} = {paid - n * price}. "
         f"The answer is ${paid - n * price}.")
    return q, s


def math_sum_diff(rng):
    a, b = rng.randint(10, 60), rng.randint(1, 40)
    big, small = a + b, a
    q = f"The sum of two numbers is {big + small} and their difference is {big - small}. Find the two numbers."
    s = (f"Let the numbers be x and y with x + y = {big + small} and x - y = {big - small}. Adding the equations gives "
         f"2x = {2 * big}, so x = {big}. Then y = {big + small} - {big} = {small}. The numbers are {big} and {small}.")
    return q, s


def math_fraction(rng):
    d = pick(rng, [2, 3, 4, 5, 6, 8, 10])
    nmr = rng.randint(1, d - 1)
    total = d * rng.randint(2, 15)
    item = pick(rng, ITEMS)
    q = f"What is {nmr}/{d} of {total} {item}?"
    s = (f"First find 1/{d}: {total} / {d} = {total // d}. "
         f"Then multiply by {nmr}: {total // d} * {nmr} = {total // d * nmr}. The answer is {total // d * nmr}.")
    return q, s


def math_expand(rng):
    v = pick(rng, VARS)
    a, b, c = rng.randint(2, 9), rng.randint(1, 12), rng.randint(1, 9)
    q = f"Simplify {a}({v} + {b}) - {c}{v}."
    coef = a - c
    s = (f"Expand the bracket: {a}({v} + {b}) = {a}{v} + {a * b}. Collect like terms: {a}{v} - {c}{v} = {coef}{v}. "
         f"The result is {coef}{v} + {a * b}.")
    return q, s


def math_evaluate(rng):
    p, q_ = pick(rng, ["a", "p", "x"]), pick(rng, ["b", "q", "y"])
    c1, c2, x, y = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 12), rng.randint(1, 12)
    q = f"Evaluate {c1}{p} + {c2}{q_} when {p} = {x} and {q_} = {y}."
    s = (f"Substitute the values: {c1} * {x} + {c2} * {y} = {c1 * x} + {c2 * y} = {c1 * x + c2 * y}. "
         f"The answer is {c1 * x + c2 * y}.")
    return q, s


MATH_UNITS = [math_add_sub, math_multiply, math_divide, math_linear, math_percent, math_rectangle, math_speed,
              math_average, math_shopping, math_sum_diff, math_fraction, math_expand, math_evaluate]
MATH_HEADS = [("Problem:", "Solution:"), ("Question:", "Answer:"), ("Q:", "A:"), ("Exercise:", "Worked answer:")]


def math_qa(rng):
    return pick(rng, MATH_UNITS)(rng)


def math_doc(rng, parts: int):
    qh, ah = pick(rng, MATH_HEADS)
    return "\n\n".join(f"{qh} {q}\n{ah} {s}" for q, s in (math_qa(rng) for _ in range(parts)))


# --------------------------------------------------------------------------------------------
# code: small Python functions
# --------------------------------------------------------------------------------------------

NOUNS = ["items", "values", "numbers", "scores", "prices", "records", "words", "names", "points", "lines", "nodes",
         "orders", "users", "tasks", "rows", "events"]
ITEM = {"items": "item", "values": "value", "numbers": "number", "scores": "score", "prices": "price",
        "records": "record", "words": "word", "names": "name", "points": "point", "lines": "line",
        "nodes": "node", "orders": "order", "users": "user", "tasks": "task", "rows": "row", "events": "event"}
CLASSES = ["Counter", "Inventory", "Stack", "Queue", "Account", "Timer", "Cache", "Registry", "Buffer", "Ledger"]


def code_sum(rng):
    xs = pick(rng, NOUNS)
    x, acc = ITEM[xs], pick(rng, ["total", "result", "acc", "s"])
    fn = pick(rng, ["total", "sum_all", f"sum_{xs}", f"add_{xs}"])
    p = f"Write a Python function that returns the sum of a list of {xs}."
    c = (f"def {fn}({xs}):\n    \"\"\"Return the sum of {xs}.\"\"\"\n    {acc} = 0\n    for {x} in {xs}:\n"
         f"        {acc} += {x}\n    return {acc}")
    return p, c


def code_max(rng):
    xs = pick(rng, NOUNS)
    x, best = ITEM[xs], pick(rng, ["best", "largest", "top", "current_max"])
    fn = pick(rng, ["find_max", f"max_{ITEM[xs]}", "largest", f"highest_{ITEM[xs]}"])
    p = f"Write a function that finds the largest of the {xs} without using max()."
    c = (f"def {fn}({xs}):\n    # assume the list is not empty\n    {best} = {xs}[0]\n    for {x} in {xs}[1:]:\n"
         f"        if {x} > {best}:\n            {best} = {x}\n    return {best}")
    return p, c


def code_count(rng):
    xs = pick(rng, NOUNS)
    x, d = ITEM[xs], pick(rng, ["counts", "freq", "tally", "seen"])
    fn = pick(rng, [f"count_{xs}", "frequencies", "histogram", f"tally_{xs}"])
    p = f"Write a Python function that counts how often each of the {xs} appears."
    c = (f"def {fn}({xs}):\n    \"\"\"Map each {x} to the number of times it occurs.\"\"\"\n    {d} = {{}}\n"
         f"    for {x} in {xs}:\n        {d}[{x}] = {d}.get({x}, 0) + 1\n    return {d}")
    return p, c


def code_filter(rng):
    xs = pick(rng, NOUNS)
    x = ITEM[xs]
    cond, desc = pick(rng, [(f"{x} % 2 == 0", "even"), (f"{x} > 0", "positive"), (f"{x} >= limit", "at least limit"),
                            (f"{x} is not None", "not None"), (f"{x} < limit", "below limit")])
    fn = pick(rng, [f"filter_{xs}", f"keep_{xs}", "select", f"{xs}_{desc.split()[0].lower()}"])
    args = f"{xs}, limit" if "limit" in cond else xs
    p = f"Write a function that keeps only the {xs} that are {desc}."
    c = (f"def {fn}({args}):\n    # keep the {xs} that are {desc}\n    return [{x} for {x} in {xs} if {cond}]")
    return p, c


def code_string(rng):
    s = pick(rng, ["text", "s", "word", "line", "message"])
    kind = rng.randrange(4)
    if kind == 0:
        return ("Write a Python function that reverses a string.",
                f"def reverse_{s}({s}):\n    \"\"\"Return {s} reversed.\"\"\"\n    return {s}[::-1]")
    if kind == 1:
        return ("Write a function that checks whether a string is a palindrome.",
                f"def is_palindrome({s}):\n    {s} = {s}.lower().replace(\" \", \"\")\n    return {s} == {s}[::-1]")
    if kind == 2:
        return ("Write a function that counts the vowels in a string.",
                f"def count_vowels({s}):\n    count = 0\n    for ch in {s}.lower():\n        if ch in \"aeiou\":\n"
                f"            count += 1\n    return count")
    return ("Write a function that capitalises every word in a string.",
            f"def title_case({s}):\n    words = {s}.split()\n    return \" \".join(w.capitalize() for w in words)")


def code_prime(rng):
    n = pick(rng, ["n", "num", "value", "k"])
    p = "Write a Python function that tests whether a number is prime."
    c = (f"def is_prime({n}):\n    if {n} < 2:\n        return False\n    i = 2\n    while i * i <= {n}:\n"
         f"        if {n} % i == 0:\n            return False\n        i += 1\n    return True")
    return p, c


def code_factorial(rng):
    n = pick(rng, ["n", "num", "k"])
    if rng.random() < 0.5:
        return ("Write a function that computes the factorial of a number.",
                f"def factorial({n}):\n    \"\"\"Return {n}! computed with a loop.\"\"\"\n    result = 1\n"
                f"    for i in range(2, {n} + 1):\n        result *= i\n    return result")
    return ("Write a function that returns the n-th Fibonacci number.",
            f"def fibonacci({n}):\n    a, b = 0, 1\n    for _ in range({n}):\n        a, b = b, a + b\n    return a")


def code_bsearch(rng):
    xs, t = pick(rng, NOUNS), pick(rng, ["target", "key", "goal"])
    p = "Write a binary search over a sorted list."
    c = (f"def binary_search({xs}, {t}):\n    lo, hi = 0, len({xs}) - 1\n    while lo <= hi:\n"
         f"        mid = (lo + hi) // 2\n        if {xs}[mid] == {t}:\n            return mid\n"
         f"        if {xs}[mid] < {t}:\n            lo = mid + 1\n"
         "        else:\n            hi = mid - 1\n    return -1")
    return p, c


def code_file(rng):
    path = pick(rng, ["path", "filename", "fname"])
    what = pick(rng, ["lines", "rows", "words"])
    p = f"Write a function that reads a file and returns its non-empty {what}."
    c = (f"def read_{what}({path}):\n    with open({path}) as f:\n        {what} = [l.strip() for l in f]\n"
         f"    return [x for x in {what} if x]")
    return p, c


def code_class(rng):
    cls, attr = pick(rng, CLASSES), pick(rng, ["count", "total", "size", "balance", "value"])
    m1, m2 = pick(rng, ["add", "push", "increment", "deposit"]), pick(rng, ["reset", "clear", "remove", "withdraw"])
    p = f"Write a small class {cls} that tracks a {attr}."
    c = (f"class {cls}:\n    def __init__(self):\n        self.{attr} = 0\n\n    def {m1}(self, amount=1):\n"
         f"        self.{attr} += amount\n        return self.{attr}\n\n    def {m2}(self):\n        self.{attr} = 0")
    return p, c


def code_average(rng):
    xs = pick(rng, NOUNS)
    p = f"Write a function that returns the average of the {xs}, or None for an empty list."
    c = (f"def average({xs}):\n    if not {xs}:\n        return None\n    return sum({xs}) / len({xs})")
    return p, c


def code_group(rng):
    xs = pick(rng, ["records", "users", "orders", "events", "rows"])
    key = pick(rng, ["city", "status", "kind", "owner", "date"])
    x = ITEM[xs]
    p = f"Write a function that groups {xs} by their {key}."
    c = (f"def group_by_{key}({xs}):\n    groups = {{}}\n    for {x} in {xs}:\n"
         f"        groups.setdefault({x}[\"{key}\"], []).append({x})\n    return groups")
    return p, c


def code_clamp(rng):
    v = pick(rng, ["value", "x", "level", "speed"])
    p = "Write a function that clamps a value between a lower and an upper bound."
    c = (f"def clamp({v}, low, high):\n    # keep {v} inside [low, high]\n    if {v} < low:\n        return low\n"
         f"    if {v} > high:\n        return high\n    return {v}")
    return p, c


def code_countdown(rng):
    n = rng.randint(3, 20)
    p = "Write a function that prints a countdown and returns the number of steps."
    c = (f"def countdown(start={n}):\n    steps = 0\n    while start > 0:\n        print(start)\n        start -= 1\n"
         f"        steps += 1\n    return steps")
    return p, c


def code_dedupe(rng):
    xs = pick(rng, NOUNS)
    x = ITEM[xs]
    p = f"Write a function that removes duplicate {xs} but keeps their order."
    c = (f"def unique_{xs}({xs}):\n    seen = set()\n    out = []\n    for {x} in {xs}:\n        if {x} not in seen:\n"
         f"            seen.add({x})\n            out.append({x})\n    return out")
    return p, c


def code_gcd(rng):
    a, b = pick(rng, [("a", "b"), ("x", "y"), ("m", "n")])
    if rng.random() < 0.5:
        return ("Write a recursive function for the greatest common divisor.",
                f"def gcd({a}, {b}):\n    if {b} == 0:\n        return {a}\n    return gcd({b}, {a} % {b})")
    return ("Write a function for the greatest common divisor using a loop.",
            f"def gcd({a}, {b}):\n    while {b}:\n        {a}, {b} = {b}, {a} % {b}\n    return {a}")


def code_chunks(rng):
    xs, size = pick(rng, NOUNS), pick(rng, ["size", "n", "width", "batch_size"])
    p = f"Write a function that splits the {xs} into chunks of a given size."
    c = (f"def chunk_{xs}({xs}, {size}):\n    return [{xs}[i:i + {size}] for i in range(0, len({xs}), {size})]")
    return p, c


def code_flatten(rng):
    outer = pick(rng, ["nested", "groups", "matrix", "lists"])
    p = "Write a function that flattens a list of lists."
    c = (f"def flatten({outer}):\n    result = []\n    for inner in {outer}:\n        for x in inner:\n"
         f"            result.append(x)\n    return result")
    return p, c


def code_parse(rng):
    s, default = pick(rng, ["text", "raw", "s", "token"]), pick(rng, ["0", "None", "-1"])
    p = "Write a function that converts a string to an int and returns a default when it fails."
    c = (f"def parse_int({s}, default={default}):\n    try:\n        return int({s})\n    except ValueError:\n"
         f"        return default")
    return p, c


def code_convert(rng):
    if rng.random() < 0.5:
        return ("Write a function that converts Celsius to Fahrenheit.",
                "def celsius_to_fahrenheit(c):\n    \"\"\"Convert degrees Celsius to Fahrenheit.\"\"\"\n"
                "    return c * 9 / 5 + 32")
    return ("Write a function that converts kilometres to miles.",
            "def km_to_miles(km):\n    # one mile is about 1.609 km\n    return km / 1.609")


def code_sort(rng):
    xs = pick(rng, ["records", "users", "orders", "events", "rows"])
    key = pick(rng, ["age", "price", "score", "date", "name"])
    rev = pick(rng, ["True", "False"])
    p = f"Write a function that sorts {xs} by {key}."
    c = (f"def sort_by_{key}({xs}):\n    return sorted({xs}, key=lambda r: r[\"{key}\"], reverse={rev})")
    return p, c


def code_invert(rng):
    d = pick(rng, ["mapping", "table", "index", "d"])
    p = "Write a function that swaps the keys and values of a dictionary."
    c = f"def invert({d}):\n    return {{v: k for k, v in {d}.items()}}"
    return p, c


def code_words(rng):
    s = pick(rng, ["text", "document", "sentence", "line"])
    p = "Write a function that returns the longest word in a text."
    c = (f"def longest_word({s}):\n    best = \"\"\n    for word in {s}.split():\n        if len(word) > len(best):\n"
         f"            best = word\n    return best")
    return p, c


CODE_UNITS = [code_gcd, code_chunks, code_flatten, code_parse, code_convert, code_sort, code_invert, code_words,
              code_sum, code_max, code_count, code_filter, code_string, code_prime, code_factorial, code_bsearch,
              code_file, code_class, code_average, code_group, code_clamp, code_countdown, code_dedupe]
IMPORTS = ["import math", "import os", "from typing import List", "import json", "from collections import Counter"]


def code_qa(rng):
    return pick(rng, CODE_UNITS)(rng)


def code_doc(rng, parts: int):
    chunks = [pick(rng, IMPORTS)] if rng.random() < 0.3 else []
    for _ in range(parts):
        prompt, code = code_qa(rng)
        if rng.random() < 0.4:
            task = prompt.replace('Write a Python function that ', '').replace('Write a function that ', '')
            code = f"# {task}\n{code}"
        chunks.append(code)
    return "\n\n\n".join(chunks)


# --------------------------------------------------------------------------------------------
# legal: contract clauses
# --------------------------------------------------------------------------------------------

PARTIES = [("Licensor", "Licensee"), ("Company", "Contractor"), ("Supplier", "Buyer"), ("Landlord", "Tenant"),
           ("Employer", "Employee"), ("Provider", "Customer"), ("Seller", "Purchaser")]
AGREEMENTS = ["Licence Agreement", "Services Agreement", "Supply Agreement", "Lease", "Employment Agreement",
              "Master Agreement", "Purchase Agreement"]
STATES = ["the State of New York", "the State of Delaware", "England and Wales", "the State of California",
          "the Province of Ontario", "Scotland", "the State of Texas"]
WITHOUT = ["the prior written consent of the {a}", "the express written approval of the {a}"]


def legal_term(rng, a, b):
    y = rng.randint(1, 10)
    s = rng.randint(2, 15)
    return "Term", (f"This Agreement shall commence on the Effective Date and shall continue for a period of "
                    f"{NUMBER_WORDS[y]} ({y}) years, unless terminated earlier in accordance with Section {s}.")


def legal_termination(rng, a, b):
    d = pick(rng, [10, 14, 30, 45, 60, 90])
    return "Termination", (f"Either party may terminate this Agreement upon {d} days' written notice "
                           "to the other party if the other party commits a material breach and fails "
                           "to cure such breach within the notice period.")


def legal_assignment(rng, a, b):
    return "Assignment", (f"The {b} shall not assign, sublicense or otherwise transfer any rights granted under this "
                          f"Agreement without {pick(rng, WITHOUT).format(a=a)}, "
                          "which shall not be unreasonably withheld.")


def legal_payment(rng, a, b):
    d, fee = pick(rng, [15, 30, 45, 60]), rng.randint(2, 95) * 500
    rate = pick(rng, ["one percent (1%)", "one and a half percent (1.5%)", "two percent (2%)"])
    return "Payment", (f"The {b} shall pay the {a} a fee of ${fee:,} within {d} days of receipt of a valid invoice. "
                       f"Late payments shall accrue interest at {rate} per month.")


def legal_confidential(rng, a, b):
    y = rng.randint(2, 7)
    return "Confidentiality", (f"Each party shall hold the Confidential Information of the other party in strict "
                               f"confidence and shall not disclose it to any third party for a period of "
                               f"{NUMBER_WORDS[y]} ({y}) years following termination of this Agreement.")


def legal_indemnity(rng, a, b):
    return "Indemnification", (f"The {b} shall indemnify, defend and hold harmless the {a} "
                               "from and against any and all "
                               f"claims, losses, damages and expenses, including reasonable attorneys' fees, arising "
                               f"out of the {b}'s breach of this Agreement.")


def legal_liability(rng, a, b):
    cap = rng.randint(1, 50) * 10000
    return "Limitation of Liability", (f"In no event shall either party be liable for any indirect, incidental or "
                                       f"consequential damages. The total liability of the {a} under this Agreement "
                                       f"shall not exceed ${cap:,}.")


def legal_law(rng, a, b):
    st = pick(rng, STATES)
    return "Governing Law", (f"This Agreement shall be governed by and construed in accordance with the laws of {st}, "
                             f"and the parties submit to the exclusive jurisdiction of the courts of {st}.")


def legal_force(rng, a, b):
    return "Force Majeure", ("Neither party shall be liable for any failure or delay in performance caused by events "
                             "beyond its reasonable control, including fire, flood, strike or act of government.")


def legal_notices(rng, a, b):
    return "Notices", ("All notices under this Agreement shall be in writing and shall be deemed given when delivered "
                       f"by hand or {pick(rng, ['three (3)', 'five (5)', 'two (2)'])} "
                       "business days after being sent by "
                       "registered mail to the address set out above.")


def legal_severability(rng, a, b):
    return "Severability", ("If any provision of this Agreement is held invalid or unenforceable, the remaining "
                            "provisions shall continue in full force and effect.")


def legal_entire(rng, a, b):
    return "Entire Agreement", ("This Agreement constitutes the entire agreement between the parties and supersedes "
                                "all prior negotiations, representations and agreements, whether written or oral.")


def legal_warranty(rng, a, b):
    m = pick(rng, [3, 6, 12, 24])
    return "Warranty", (f"The {a} warrants that the deliverables shall conform to the specifications for a period of "
                        f"{m} months from delivery. The {b}'s sole remedy shall be repair or replacement.")


def legal_licence(rng, a, b):
    scope = pick(rng, ["non-exclusive, non-transferable", "exclusive", "limited, revocable"])
    return "Grant of Licence", (f"Subject to the terms of this Agreement, the {a} hereby grants to the {b} a {scope} "
                                f"licence to use the Software solely for its internal business purposes.")


LEGAL_UNITS = [legal_term, legal_termination, legal_assignment, legal_payment, legal_confidential, legal_indemnity,
               legal_liability, legal_law, legal_force, legal_notices, legal_severability, legal_entire,
               legal_warranty, legal_licence]


def legal_clause(rng, section: str | None = None):
    a, b = pick(rng, PARTIES)
    title, body = pick(rng, LEGAL_UNITS)(rng, a, b)
    section = section or f"{rng.randint(1, 14)}.{rng.randint(1, 9)}"
    return a, b, title, f"Section {section} {title}. {body}"


def legal_qa(rng):
    a, b, title, clause = legal_clause(rng)
    agr = pick(rng, AGREEMENTS)
    article = "an" if title[0] in "AEIOU" else "a"
    prompt = pick(rng, [f"Draft {article} {title.lower()} clause for a {agr}.",
                        f"What should the {title.lower()} section of a {agr} say?",
                        f"Write the {title.lower()} provision between the {a} and the {b}."])
    return prompt, clause


def legal_doc(rng, parts: int):
    major = rng.randint(1, 14)
    first = rng.randint(1, 5)
    out = []
    if rng.random() < 0.3:
        a, b = pick(rng, PARTIES)
        out.append(f"This {pick(rng, AGREEMENTS)} is entered into between the {a} and the {b} "
                   "as of the Effective Date.")
    for i in range(parts):
        out.append(legal_clause(rng, f"{major}.{first + i}")[3])
    return "\n\n".join(out)


# --------------------------------------------------------------------------------------------
# recipes: ingredients and numbered steps
# --------------------------------------------------------------------------------------------

DISHES = {  # dish -> (method, main ingredients)
    "tomato soup": ("soup", ["tomatoes", "onion", "garlic", "vegetable stock"]),
    "lentil curry": ("stew", ["red lentils", "onion", "curry paste", "coconut milk"]),
    "banana bread": ("bake", ["bananas", "flour", "butter", "sugar", "eggs"]),
    "pancakes": ("pan", ["flour", "milk", "eggs", "butter"]),
    "chicken stir fry": ("pan", ["chicken breast", "soy sauce", "peppers", "ginger"]),
    "vegetable lasagne": ("bake", ["lasagne sheets", "courgettes", "tomato sauce", "cheese"]),
    "mushroom risotto": ("stew", ["arborio rice", "mushrooms", "vegetable stock", "parmesan"]),
    "chocolate cake": ("bake", ["flour", "cocoa powder", "sugar", "eggs", "butter"]),
    "beef chili": ("stew", ["minced beef", "kidney beans", "tomatoes", "chili powder"]),
    "pumpkin soup": ("soup", ["pumpkin", "onion", "cream", "vegetable stock"]),
    "omelette": ("pan", ["eggs", "cheese", "chives", "butter"]),
    "apple crumble": ("bake", ["apples", "flour", "butter", "oats", "sugar"]),
    "fried rice": ("pan", ["cooked rice", "eggs", "peas", "soy sauce"]),
    "chickpea stew": ("stew", ["chickpeas", "tomatoes", "spinach", "cumin"]),
    "roast potatoes": ("bake", ["potatoes", "olive oil", "rosemary", "salt"]),
    "leek soup": ("soup", ["leeks", "potatoes", "butter", "chicken stock"]),
}
ADJECTIVES = ["Easy", "Classic", "Quick", "Homemade", "Rustic", "Creamy", "Spicy", "Simple", "Weeknight", "Hearty"]
UNITS = {"tomato sauce": "ml", "black pepper": "tsp", "parsley": "tbsp", "lemon juice": "tbsp", "paprika": "tsp",
         "chives": "tbsp", "peas": "g", "mushrooms": "g", "pumpkin": "g", "chicken breast": "g", "garlic": "cloves",
         "flour": "g", "sugar": "g", "butter": "g", "oats": "g", "cocoa powder": "g", "cheese": "g", "parmesan": "g",
         "milk": "ml", "cream": "ml", "coconut milk": "ml", "vegetable stock": "ml", "chicken stock": "ml",
         "soy sauce": "tbsp", "olive oil": "tbsp", "curry paste": "tbsp", "chili powder": "tsp", "cumin": "tsp",
         "salt": "tsp", "ginger": "tsp", "arborio rice": "g", "red lentils": "g", "cooked rice": "g",
         "minced beef": "g", "chickpeas": "g", "kidney beans": "g", "lasagne sheets": "g", "spinach": "g"}
EXTRAS = ["salt", "black pepper", "olive oil", "parsley", "lemon juice", "paprika"]


def recipe_quantity(rng, ing: str) -> str:
    unit = UNITS.get(ing)
    if unit == "g":
        return f"{rng.randint(2, 12) * 25} g {ing}"
    if unit == "ml":
        return f"{rng.randint(1, 10) * 100} ml {ing}"
    if unit in ("tbsp", "tsp"):
        return f"{pick(rng, ['1/2', '1', '2', '3'])} {unit} {ing}"
    if unit == "cloves":
        return f"{rng.randint(1, 4)} cloves {ing}"
    return f"{rng.randint(1, 6)} {ing}" if rng.random() < 0.7 else f"{pick(rng, ['1/2', '1', '2'])} cups chopped {ing}"


def recipe_steps(rng, method: str, ings: list[str]) -> list[str]:
    a, b = ings[0], ings[1]
    t = rng.randint(5, 40)
    if method == "bake":
        temp = pick(rng, [160, 170, 180, 190, 200, 220])
        return [f"Preheat the oven to {temp}°C and grease a baking tin.",
                f"Mix the {a} and {b} in a large bowl until smooth.",
                f"Stir in the {ings[2]} and season with a pinch of {pick(rng, EXTRAS)}.",
                f"Pour into the tin and bake for {t + 15} minutes until golden.",
                f"Leave to cool for {rng.randint(5, 15)} minutes before serving."]
    if method == "soup":
        return [f"Heat {rng.randint(1, 3)} tbsp of oil in a large pot over medium heat.",
                f"Add the chopped {b} and cook for {rng.randint(3, 8)} minutes until soft.",
                f"Add the {a} and the {ings[-1]} and bring to the boil.",
                f"Simmer for {t} minutes, then blend until smooth.",
                f"Season with {pick(rng, EXTRAS)} and serve hot."]
    if method == "stew":
        return [f"Fry the {b} in a heavy pan for {rng.randint(3, 8)} minutes.",
                f"Add the {a} and stir for {rng.randint(1, 3)} minutes.",
                f"Pour in the {ings[2]}, cover and simmer gently for {t + 10} minutes, stirring occasionally.",
                f"Stir in the {ings[-1]} and cook for another {rng.randint(2, 6)} minutes.",
                f"Garnish with {pick(rng, EXTRAS)} and serve with bread or rice."]
    return [f"Whisk the {a} with the {b} in a bowl.",
            f"Heat a frying pan over {pick(rng, ['medium', 'high', 'medium-high'])} heat and melt a little butter.",
            f"Cook the mixture for {rng.randint(2, 6)} minutes, turning once.",
            f"Add the {ings[2]} and cook for {rng.randint(1, 4)} more minutes.",
            f"Serve immediately with {pick(rng, EXTRAS)}."]


def recipe_qa(rng, short: bool = False):
    dish = pick(rng, list(DISHES))
    method, mains = DISHES[dish]
    ings = list(mains) + rng.sample(EXTRAS, rng.randint(1, 2))
    title = f"{pick(rng, ADJECTIVES)} {dish.title() if rng.random() < 0.5 else dish}"
    steps = recipe_steps(rng, method, ings)
    if short:
        steps = steps[: rng.randint(3, 4)]
    body = ("Ingredients:\n" + "\n".join(f"- {recipe_quantity(rng, i)}" for i in ings)
            + "\n\nMethod:\n" + "\n".join(f"{k}. {s}" for k, s in enumerate(steps, 1)))
    prompt = pick(rng, [f"How do I make {dish}?", f"Give me a recipe for {dish}.",
                        f"What do I need to cook {dish} for {rng.randint(2, 8)} people?",
                        f"How long do I cook {dish}?"])
    return prompt, f"{title}\nServes {rng.randint(2, 8)}.\n\n{body}"


def recipe_doc(rng, parts: int):
    return "\n\n".join(recipe_qa(rng, short=parts > 1)[1] for _ in range(parts))


# --------------------------------------------------------------------------------------------
# documents, chats and queries per domain
# --------------------------------------------------------------------------------------------

GENERATORS: dict[str, tuple[Callable, Callable, tuple[int, int]]] = {  # doc, (prompt, answer), parts range
    "math": (math_doc, math_qa, (1, 4)),
    "code": (code_doc, code_qa, (1, 3)),
    "legal": (legal_doc, legal_qa, (1, 4)),
    "recipes": (recipe_doc, recipe_qa, (1, 2)),
}
QUERY_PREFIXES = ["", "", "", "Please help: ", "Quick question. ", "Can you help me? "]


def make_record(domain: str, rng: random.Random, chat_prob: float = 0.25) -> dict:
    """One training/demo/eval record: ``{"text": ...}`` or a user/assistant ``{"messages": ...}``."""
    doc, qa, (lo, hi) = GENERATORS[domain]
    if rng.random() < chat_prob:
        prompt, answer = qa(rng)
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    return {"text": doc(rng, rng.randint(lo, hi))}


def make_query(domain: str, rng: random.Random) -> dict:
    """A short user query of the domain (the prompt half of a chat)."""
    prompt = GENERATORS[domain][1](rng)[0]
    return {"text": pick(rng, QUERY_PREFIXES) + prompt}


def domain_rng(domain: str, split: str) -> random.Random:
    return random.Random(SEED * 1000 + DOMAIN_SEEDS[split] * 100 + sorted(DOMAINS).index(domain))


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

def render(record: dict, tokenizer) -> list[int]:
    """Token ids of a record, the way moeprune encodes demos (text: bos + text; chat: template)."""
    if "messages" in record:
        ids = tokenizer.apply_chat_template(record["messages"], tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(record["text"])["input_ids"]


def record_text(record: dict) -> str:
    if "messages" in record:
        return "\n".join(f"{m['role']}\n{m['content']}" for m in record["messages"])
    return record["text"]


def train_tokenizer(texts: list[str], out: Path):
    """Byte-level BPE with special tokens, bos prepended to every text, and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(SPECIAL["bos"])
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIAL['bos']} $A", pair=f"{SPECIAL['bos']} $A $B",
                                                       special_tokens=[(SPECIAL["bos"], bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
                                   pad_token=SPECIAL["pad"], additional_special_tokens=ROLE_TOKENS,
                                   model_max_length=SEQ_LEN, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


# --------------------------------------------------------------------------------------------
# data splits
# --------------------------------------------------------------------------------------------

def sample_split(domain: str, split: str, n: int, tokenizer, exclude: set[str], chat_prob: float) -> list[dict]:
    """``n`` records of ``MIN_TOKENS``..``MAX_TOKENS`` tokens, none of them in ``exclude`` (the training texts)."""
    rng, out = domain_rng(domain, split), []
    while len(out) < n:
        rec = make_record(domain, rng, chat_prob)
        if record_text(rec) in exclude or not MIN_TOKENS <= len(render(rec, tokenizer)) <= MAX_TOKENS:
            continue
        exclude.add(record_text(rec))
        out.append(rec)
    return out


def sample_queries(domain: str, n: int) -> list[dict]:
    rng, seen, out = domain_rng(domain, "queries"), set(), []
    while len(out) < n:
        q = make_query(domain, rng)
        if q["text"] not in seen:
            seen.add(q["text"])
            out.append(q)
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def pack_rows(docs: list[list[int]], eos_id: int, pad_id: int, rng: random.Random) -> torch.Tensor:
    """Pack same-domain documents (each followed by eos) into rows of ``SEQ_LEN`` that start at a document."""
    rows, row = [], []
    for ids in docs:
        ids = ids[: SEQ_LEN - 1] + [eos_id]
        if row and len(row) + len(ids) > SEQ_LEN:
            rows.append(row + [pad_id] * (SEQ_LEN - len(row)))
            row = []
        row += ids
    if row:
        rows.append(row + [pad_id] * (SEQ_LEN - len(row)))
    return torch.tensor(rows)


# --------------------------------------------------------------------------------------------
# model, training, evaluation
# --------------------------------------------------------------------------------------------

def build_model(tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=160, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=2,
                        max_position_embeddings=SEQ_LEN, tie_word_embeddings=False, router_aux_loss_coef=0.01,
                        output_router_logits=False, router_jitter_noise=0.0, rms_norm_eps=1e-5,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, sliding_window=None, initializer_range=0.02)
    torch.manual_seed(SEED)
    return MixtralForCausalLM(cfg)


def specialisation_loss(router_logits: tuple[torch.Tensor, ...], mask: torch.Tensor,
                        target_experts: float) -> torch.Tensor:
    """Negative mutual information between rows and experts, averaged over layers.

    Every training row holds texts of one domain. With ``p_row`` the row's mean router distribution, the
    loss is ``mean_rows max(0, H(p_row) - log(target_experts)) - H(mean_rows p_row)``: it is low when each
    row spreads over about ``target_experts`` experts only, while the batch as a whole still spreads over
    all of them, i.e. when experts specialise by domain. (The standard load-balancing loss stays on too.)
    """
    rows = mask.shape[0]
    weight = mask.reshape(rows, -1, 1).float()
    total = 0.0
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1).view(rows, -1, logits.shape[-1])
        p_row = (probs * weight).sum(1) / weight.sum(1)
        p_all = p_row.mean(0)
        h_row = F.relu(-(p_row * torch.log(p_row + 1e-9)).sum(-1) - math.log(target_experts)).mean()
        h_all = -(p_all * torch.log(p_all + 1e-9)).sum()
        total = total + h_row - h_all
    return total / len(router_logits)


def train(model, rows: torch.Tensor, steps: int, batch: int, lr: float, pad_id: int, spec_coef: float,
          target_experts: float, log_every: int = 25) -> None:
    """AdamW with warm-up and cosine decay; the router load-balancing and specialisation losses are on."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    g = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(rows), generator=g)
    model.train()
    t0, pos = time.time(), 0
    for step in range(1, steps + 1):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(rows), generator=g), 0
        x = rows[order[pos: pos + batch]]
        pos += batch
        labels = x.masked_fill(x == pad_id, -100)
        mask = x != pad_id
        out = model(input_ids=x, attention_mask=mask.long(), labels=labels, output_router_logits=True,
                    use_cache=False)
        spec = specialisation_loss(out.router_logits, mask, target_experts)
        opt.zero_grad(set_to_none=True)
        (out.loss + spec_coef * spec).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == 1 or step == steps:
            lm = out.loss.item() - model.config.router_aux_loss_coef * out.aux_loss.item()
            print(f"  step {step:4d}/{steps}  lm loss {lm:.3f}  balance {out.aux_loss.item():.3f}  "
                  f"specialisation {spec.item():.3f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:.0f}s", flush=True)
    model.eval()


def routers(model) -> list:
    return [layer.mlp.gate for layer in model.model.layers]


@torch.inference_mode()
def perplexity(model, encoded: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for ids in encoded:
        x = torch.tensor([ids])
        logits = model(x, use_cache=False).logits[0, :-1]
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


@torch.inference_mode()
def expert_counts(model, encoded: list[list[int]]) -> torch.Tensor:
    """(layers, experts) number of top-k selections over all tokens of ``encoded``."""
    gates = routers(model)
    counts = torch.zeros(len(gates), gates[0].num_experts)

    def hook(module, inputs, output, layer):
        counts[layer] += torch.bincount(output[2].reshape(-1), minlength=module.num_experts).float()

    hooks = [g.register_forward_hook(lambda m, i, o, l=l: hook(m, i, o, l)) for l, g in enumerate(gates)]
    try:
        for ids in encoded:
            model(torch.tensor([ids]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return counts


@torch.inference_mode()
def masked_perplexity(model, encoded: list[list[int]], allowed: list[list[int]]) -> float:
    """Perplexity when router logits of experts outside ``allowed[layer]`` are set to -inf."""
    hooks = []
    for l, gate in enumerate(routers(model)):
        mask = torch.full((gate.num_experts,), float("-inf"))
        mask[allowed[l]] = 0.0

        def hook(m, inputs, output, mask=mask):
            logits = output[0] + mask
            probs = torch.softmax(logits.float(), dim=-1)
            top, idx = torch.topk(probs, m.top_k, dim=-1)
            return logits, top / top.sum(-1, keepdim=True), idx

        hooks.append(gate.register_forward_hook(hook))
    try:
        return perplexity(model, encoded)
    finally:
        for h in hooks:
            h.remove()


def report(model, tokenizer, demos: dict, evals: dict) -> dict:
    """Per-domain perplexity, expert usage, top-8 overlaps and the masking check; returns a summary."""
    enc_demo = {d: [render(r, tokenizer) for r in recs] for d, recs in demos.items()}
    enc_eval = {d: [render(r, tokenizer) for r in recs] for d, recs in evals.items()}
    n_exp = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    half = n_exp // 2
    summary: dict = {"vocab": len(tokenizer), "domains": {}}
    usage_eval = {d: expert_counts(model, enc_eval[d]) for d in DOMAINS}
    usage_demo = {d: expert_counts(model, enc_demo[d]) for d in DOMAINS}
    print(f"\nper-domain eval perplexity (uniform over the vocabulary = {len(tokenizer)}):")
    for d in DOMAINS:
        ppl = perplexity(model, enc_eval[d])
        order = usage_demo[d].argsort(dim=1, descending=True)  # ranked on the demos, measured on eval
        top, bottom = order[:, :half].tolist(), order[:, half:].tolist()
        p_keep_top = masked_perplexity(model, enc_eval[d], top)
        p_keep_bottom = masked_perplexity(model, enc_eval[d], bottom)
        summary["domains"][d] = {"ppl": ppl, "ppl_top_half_only": p_keep_top, "ppl_bottom_half_only": p_keep_bottom}
        print(f"  {d:8s} ppl {ppl:7.3f} | only most-used {half}/{n_exp} experts: {p_keep_top:7.3f} "
              f"| only least-used {half}: {p_keep_bottom:9.3f}")
    print("\ntop experts per layer on the eval set (share of top-2 selections):")
    for d in DOMAINS:
        u = usage_eval[d] / usage_eval[d].sum(dim=1, keepdim=True)
        rows = []
        for l in range(u.shape[0]):
            v, i = u[l].topk(4)
            rows.append("L%d " % l + " ".join(f"{e}:{p:.0%}" for e, p in zip(i.tolist(), v.tolist())))
        print(f"  {d:8s} " + " | ".join(rows))
    names = list(DOMAINS)
    for k in (n_exp // 4, half):
        ranked = {d: usage_eval[d].argsort(dim=1, descending=True)[:, :k] for d in names}
        share = {d: float((usage_eval[d].gather(1, ranked[d]).sum(1) / usage_eval[d].sum(1)).mean()) for d in names}
        print(f"\ntop-{k} experts per layer carry " + ", ".join(f"{d} {v:.0%}" for d, v in share.items())
              + f" of the routing; overlap of per-domain top-{k} sets (mean over layers, of {k}):")
        tops = {d: [set(r) for r in ranked[d].tolist()] for d in names}
        overlaps = {}
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                overlaps[f"{a}/{b}"] = sum(len(x & y) for x, y in zip(tops[a], tops[b])) / len(tops[a])
        print("  " + "  ".join(f"{pair} {v:.2f}" for pair, v in overlaps.items()))
        summary[f"top{k}_overlap"] = overlaps
    return summary


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def report_saved(out: Path, model_name: str = "tiny-moe") -> int:
    """Report on the model and data of an existing profiles folder (over ``DOMAINS``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = out / "models" / model_name
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    demos = {d: read_jsonl(out / "demos" / f"{d}.jsonl") for d in DOMAINS}
    evals = {d: read_jsonl(out / "eval" / f"{d}.jsonl") for d in DOMAINS}
    report(model, tokenizer, demos, evals)
    return 0


def setup_determinism() -> None:
    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True, warn_only=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "profiles")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-docs", type=int, default=N_TRAIN_DOCS, help="training documents per domain")
    ap.add_argument("--spec-coef", type=float, default=0.1, help="weight of the expert-specialisation loss")
    ap.add_argument("--target-experts", type=float, default=4.0,
                    help="experts per layer each domain should spread over (specialisation loss)")
    ap.add_argument("--report-only", action="store_true", help="only report on an already built --out folder")
    args = ap.parse_args(argv)
    setup_determinism()
    if args.report_only:
        return report_saved(args.out)
    start = time.time()
    model_dir = args.out / "models" / "tiny-moe"
    model_dir.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():  # stale shards of an earlier run
        if f.is_file():
            f.unlink()

    print("generating corpora ...", flush=True)
    train_recs = {}
    for d in DOMAINS:
        rng = domain_rng(d, "train")
        train_recs[d] = [make_record(d, rng) for _ in range(args.train_docs)]
    texts = [record_text(r) for d in DOMAINS for r in train_recs[d]]

    print("training tokenizer ...", flush=True)
    tokenizer = train_tokenizer(texts, model_dir)
    seen = set(texts)
    demos = {d: sample_split(d, "demos", N_DEMOS, tokenizer, seen, chat_prob=0.25) for d in DOMAINS}
    evals = {d: sample_split(d, "eval", N_EVAL, tokenizer, seen, chat_prob=0.0) for d in DOMAINS}
    queries = {d: sample_queries(d, N_QUERIES) for d in DOMAINS}

    rng = random.Random(SEED)
    packed = [pack_rows([render(r, tokenizer) for r in train_recs[d]], tokenizer.eos_token_id,
                        tokenizer.pad_token_id, rng) for d in DOMAINS]
    rows = torch.cat(packed)
    n_tok = int((rows != tokenizer.pad_token_id).sum())
    print(f"  {len(texts)} training documents, {n_tok} tokens in {len(rows)} rows of {SEQ_LEN}; "
          f"vocab {len(tokenizer)}  [{time.time() - start:.0f}s]", flush=True)

    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training MixtralForCausalLM ({n_params / 1e6:.2f}M parameters) for {args.steps} steps "
          f"of {args.batch}x{SEQ_LEN} tokens ...", flush=True)
    train(model, rows, args.steps, args.batch, args.lr, tokenizer.pad_token_id, args.spec_coef,
          args.target_experts)

    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(model_dir, max_shard_size="4MB")
    tokenizer.save_pretrained(model_dir)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    print(f"saved {model_dir} ({size / 2**20:.1f} MiB of safetensors in "
          f"{len(list(model_dir.glob('*.safetensors')))} shards)  [{time.time() - start:.0f}s]", flush=True)

    (args.out / "domains.json").write_text(json.dumps(DOMAINS, indent=2) + "\n")
    for d in DOMAINS:
        write_jsonl(args.out / "demos" / f"{d}.jsonl", demos[d])
        write_jsonl(args.out / "eval" / f"{d}.jsonl", evals[d])
        write_jsonl(args.out / "queries" / f"{d}.jsonl", queries[d])

    report(model, tokenizer, demos, evals)
    print(f"\ndone in {time.time() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
