"""Structured outputs: a request's constraint (any JSON object, a JSON schema, a regex, a choice of strings,
a Lark or GBNF grammar) compiled with llguidance against the model's tokenizer, and a matcher per
generation that gives the tokens allowed next and follows the tokens sampled.

llguidance (vLLM's and SGLang's `guidance` backend) reads tokenizer.json itself and computes a step's mask
lazily over a token trie (about 20 us a row at 4,096 tokens on the CPU of benchmarks/RESULTS.md). A grammar is
compiled once per request; each choice (n) starts from a copy of it. Shapes: G grammar rows, W = ceil(V/32)
words of a bitmask, V the model's vocabulary (it may be larger than the tokenizer's: those ids are never
allowed).
"""

from __future__ import annotations

import functools
import json

import llguidance
import torch

KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")


@functools.lru_cache(maxsize=4)
def ll_tokenizer(tokenizer, n_vocab: int, eos: tuple[int, ...]) -> llguidance.LLTokenizer:
    """llguidance's view of a `Tokenizer` (its tokenizer.json), built once per tokenizer (17 ms for 4K tokens,
    0.15 s for 32K; about a second for V3's 129K by llguidance's account)."""
    return llguidance.LLTokenizer(tokenizer.tok.to_str(), n_vocab=n_vocab, eos_token=list(eos) or None)


def grammar_text(kind: str, spec, lenient: bool = False, compact: bool = False) -> str:
    """llguidance's grammar for a constraint. json_object: any object; json_schema: a dict (or its JSON text),
    `lenient`: keywords llguidance cannot enforce are ignored and oneOf is taken as anyOf (else refused, and
    so is a oneOf whose branches it cannot prove exclusive), `compact`: no whitespace between JSON tokens
    (else any, as vLLM's default); regex: the whole output matches; choice: one of a list of strings;
    grammar: Lark (llguidance's dialect) or GBNF."""
    options = {**({"lenient": True, "coerce_one_of": True} if lenient else {}),
               **({"whitespace_flexible": False} if compact else {})}
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=options or None)
    if kind == "json_schema":
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"the schema is not valid JSON ({e})") from None
        if not isinstance(spec, (dict, bool)):
            raise ValueError(f"a JSON schema is an object, got {type(spec).__name__}")
        return llguidance.LLMatcher.grammar_from_json_schema(spec, overrides=options or None)
    if kind == "regex":
        if not isinstance(spec, str):
            raise ValueError(f"a regex is a string, got {type(spec).__name__}")
        return llguidance.grammar_from("regex", spec)
    if kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(s, str) for s in spec):
            raise ValueError("choice is a non-empty list of strings")
        return llguidance.grammar_from("choice", spec)
    if kind == "grammar":
        if not isinstance(spec, str):
            raise ValueError(f"a grammar is a string, got {type(spec).__name__}")
        return llguidance.grammar_from("grammar", spec)
    raise ValueError(f"unknown constraint kind {kind!r}; one of {', '.join(KINDS)}")


class Grammar:
    """A compiled constraint: the matcher in its start state. `after`: enforce only after this token is sampled
    (the `</think>` id under a reasoning parser); None: from the first token."""

    def __init__(self, kind: str, spec, tokenizer, vocab_size: int, eos: list[int], lenient: bool = False,
                 compact: bool = False):
        text = grammar_text(kind, spec, lenient, compact)
        tok = ll_tokenizer(tokenizer, max(vocab_size, tokenizer.vocab_size), tuple(eos))
        self.matcher = llguidance.LLMatcher(tok, text, log_level=0)
        if self.matcher.is_error():
            raise ValueError(self.matcher.get_error())
        self.warnings = self.matcher.get_grammar_warnings()       # lenient: what it will not enforce
        self.kind, self.words, self.after = kind, (tok.vocab_size + 31) // 32, None

    def start(self) -> GrammarMatcher:
        """A fresh matcher for one generation (a copy: compiling is the cost, copying is microseconds)."""
        return GrammarMatcher(self.matcher.deep_copy(), self.words, self.after)


class GrammarMatcher:
    """One generation's grammar state: `fill` its next mask, `advance` by each token sampled."""

    def __init__(self, matcher: llguidance.LLMatcher, words: int, after: int | None = None):
        self.m, self.words, self.after = matcher, words, after      # words: the bitmask's int32s
        self.active = after is None           # enforcing (the `after` token has been sampled)

    def fill(self, bits_W: torch.Tensor):
        """The tokens allowed next, one bit each, into a contiguous int32 row of `words` (llguidance writes
        it with the GIL released)."""
        self.m.unsafe_compute_mask_ptr(bits_W.data_ptr(), self.words * 4)

    def advance(self, token: int) -> bool:
        """Follow a sampled token; False if the grammar refuses it (then `error` says why)."""
        if not self.active:
            self.active = token == self.after
            return True
        return self.m.consume_token(token)

    @property
    def finished(self) -> bool:
        """The output is complete: the grammar takes no more tokens (EOS aside)."""
        return self.active and self.m.is_stopped() and not self.m.is_error()

    @property
    def error(self) -> str:
        """llguidance's message, its first line (the rest dumps the parser's state and the grammar)."""
        return self.m.get_error().partition("\n")[0]


def allowed_mask(matchers: list[GrammarMatcher], vocab_size: int, device) -> torch.Tensor:
    """[G, V] bool: the tokens each matcher allows next; ids past the tokenizer's never."""
    W = max(max(m.words for m in matchers), (vocab_size + 31) // 32)
    bits_GW = torch.zeros(len(matchers), W, dtype=torch.int32)
    for m, row in zip(matchers, bits_GW):
        m.fill(row)
    shifts = torch.arange(32, dtype=torch.int32)
    allowed_GV = ((bits_GW[:, :, None] >> shifts) & 1).bool().view(len(matchers), W * 32)[:, :vocab_size]
    return allowed_GV.to(device)
