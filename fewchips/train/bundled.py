"""Post-training data that ships with every machine, as the pre-training default (the standard
library's own source) does: nothing is downloaded.

  - Code requests: for functions of the standard library with a docstring, the user asks for the
    function (its name, signature and the docstring's first paragraph) and the assistant answers
    with its source. The pre-trained demo model has read these files; SFT teaches it the chat form.
  - Arithmetic: "What is 7 + 5?" answered \\boxed{12}, a task with an exactly checkable answer in the
    designated format (what GRPO's rule-based reward needs; `fewchips grpo --task arithmetic`).
"""

from __future__ import annotations

import ast
import random

from . import data as D

ARITHMETIC_SYSTEM = "Answer in \\boxed{}."


def stdlib_function_chats(max_chats: int = 3000, max_chars: int = 1200, seed: int = 0) -> list[list[dict]]:
    chats = []
    for name, text in D.read_documents(None):
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            src = ast.get_source_segment(text, node)
            if not doc or not src or len(src) > max_chars:
                continue
            summary = doc.strip().split("\n\n")[0].replace("\n", " ")
            request = f"Write a Python function `{node.name}({ast.unparse(node.args)})`. {summary}"
            chats.append([{"role": "user", "content": request}, {"role": "assistant", "content": src}])
    random.Random(seed).shuffle(chats)
    return chats[:max_chats]


def arithmetic_problem(rng: random.Random, max_operand: int = 9) -> tuple[str, str]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    op = rng.choice("+-")
    return f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b)


def arithmetic_chats(n: int = 1500, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        q, a = arithmetic_problem(rng)
        chats.append([{"role": "system", "content": ARITHMETIC_SYSTEM}, {"role": "user", "content": q},
                      {"role": "assistant", "content": f"\\boxed{{{a}}}"}])
    return chats


def bundled_chats(seed: int = 0) -> list[list[dict]]:
    """The default SFT set: stdlib code requests and arithmetic, shuffled together."""
    chats = stdlib_function_chats(seed=seed) + arithmetic_chats(seed=seed)
    random.Random(seed).shuffle(chats)
    return chats
