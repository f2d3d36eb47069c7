"""DeepSeek-R1's reasoning split (vLLM's `deepseek_r1` reasoning parser): what the model writes before
`</think>` is its reasoning, the rest its answer. R1's chat template opens `<think>` in the prompt, so
the output starts inside it (a `<think>` the model writes itself is dropped); an output without
`</think>` is reasoning only. The split is made on token ids where `</think>` is one token (decoding
may strip it if the tokenizer marks it special), else on the text."""

from __future__ import annotations

from .tokenizer import TextStream

START, END = "<think>", "</think>"


def opens_thinking(template: str | None) -> bool:
    """Whether a chat template opens a reasoning block (R1's and V3.1's thinking mode do)."""
    return bool(template) and START in template


class ReasoningSplit:
    """A TextStream in two: `push(ids)` and `flush()` return (reasoning delta, content delta)."""

    def __init__(self, tokenizer, stops: list[str], skip_special_tokens: bool = True, include_stop: bool = False,
                 prompt: list[int] | None = None, content=None):
        """`prompt`: the request's ids; when its last think token is `</think>` (a V3.1-style non-thinking
        prompt closes the block itself), the output is all content. `content`: the stream the ids after
        `</think>` go to (token mode; a `tool_calls.ToolCallStream` to read tool calls there), whose deltas
        and text `push`, `flush` and `text` return as the content part."""
        ids = [tokenizer.encode(t, add_special_tokens=False) for t in (START, END)]
        self.start_id, self.end_id = (x[0] if len(x) == 1 else None for x in ids)
        self.reasoning_ids = TextStream(tokenizer, stops, skip_special_tokens, include_stop)
        self.content_ids = content or TextStream(tokenizer, stops, skip_special_tokens, include_stop)
        self.ended = self.end_id is not None and next(
            (t for t in reversed(prompt or []) if t in (self.start_id, self.end_id)), None) == self.end_id
        self.no_reasoning = self.ended            # the prompt closed it: reasoning_content is null
        self.held = ""                            # text mode: reasoning text that may be the start of </think>
        self.started = False                      # text mode: past a leading <think>, if any

    def push(self, ids: list[int]) -> tuple[str, str]:
        if self.end_id is None:                   # text mode: every id to one stream, split on its text
            return self._split(self.reasoning_ids.push(ids))
        r, c = [], []
        for t in ids:
            if not self.ended and t == self.end_id:
                self.ended = True
            elif self.ended:
                c.append(t)
            elif not (t == self.start_id and not self.reasoning_ids.ids and not r):
                r.append(t)
        return (self.reasoning_ids.push(r) if r else ""), self.content_ids.push(c)

    def flush(self) -> tuple[str, str]:
        if self.end_id is None:
            return self._split(self.reasoning_ids.flush(), final=True)
        return self.reasoning_ids.flush(), self.content_ids.flush()

    def _split(self, delta: str, final: bool = False) -> tuple[str, str]:
        """Text mode: route a delta, holding back a reasoning tail that may be the start of </think>."""
        if self.ended:
            return "", delta
        text = self.held + delta
        if not self.started:
            if len(text) < len(START) and START.startswith(text) and not final:
                self.held = text                  # perhaps the model's own <think>: wait and see
                return "", ""
            self.started = True
            text = text[len(START):] if text.startswith(START) else text
        if END in text:
            self.ended = True
            self.held = ""
            before, after = text.split(END, 1)
            return before, after
        keep = 0 if final else next((k for k in range(len(END) - 1, 0, -1) if text.endswith(END[:k])), 0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], ""

    @property
    def text(self) -> tuple[str | None, str | None]:
        """(reasoning, content) of the whole output; content None when </think> never came, reasoning None
        when the prompt had closed the block."""
        if self.end_id is None:                   # text mode
            whole = self.reasoning_ids.text
            whole = whole[len(START):] if whole.startswith(START) else whole
            if END not in whole:
                return whole, None
            before, after = whole.split(END, 1)
            return before, after
        return (None if self.no_reasoning else self.reasoning_ids.text), (self.content_ids.text if self.ended else None)
