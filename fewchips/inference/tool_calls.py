"""DeepSeek-V3's tool calls in a model's output (vLLM's `deepseek_v3` tool parser), read on token ids:
text decoding may strip the markers when the tokenizer marks them special.

    CONTENT<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
    (\\n<｜tool▁call▁begin｜>... for each further call)<｜tool▁calls▁end｜>

`ToolCallStream.push(ids)` returns what a streaming client is sent: a content delta, and tool-call deltas
in OpenAI's shape (the first delta of a call carries its index, id, type and name; its arguments follow
in one delta once the call is closed). `.result()` is the whole message: content and the parsed calls.
"""

from __future__ import annotations

import json
import uuid

from .tokenizer import TextStream

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


def marker_ids(tokenizer) -> dict | None:
    """The five markers' token ids, or None when the tokenizer lacks one (no tool calls to parse)."""
    ids = {}
    for name in (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP):
        i = tokenizer.tok.token_to_id(name)
        if i is None:
            return None
        ids[name] = i
    return ids


def renders_tool_calls(template: str | None) -> bool:
    """Whether a chat template writes assistant tool calls (V3's, R1's and fewchips' do)."""
    return bool(template) and "tool_calls" in template and CALL_BEGIN in template


def parse_call(text: str) -> tuple[str, str]:
    """`function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```` (between the call's markers, SEP already split
    off: "NAME\\n```json\\nARGS\\n```") -> (name, arguments as a JSON string)."""
    name, _, rest = text.partition("\n")
    args = rest.strip()
    if args.startswith("```"):
        args = args.split("\n", 1)[1] if "\n" in args else ""
    if args.endswith("```"):
        args = args[:-3]
    args = args.strip()
    try:                                          # as the model wrote it when it is JSON, else as text
        json.loads(args)
    except ValueError:
        pass
    return name.strip(), args


class ToolCallStream:
    """A choice's output split into content and tool calls as the ids arrive."""

    def __init__(self, tokenizer, markers: dict, stops: list[str], skip_special_tokens: bool = True,
                 include_stop: bool = False):
        self.tok, self.m = tokenizer, markers
        self.content = TextStream(tokenizer, stops, skip_special_tokens, include_stop)
        self.state = "content"                    # content | between (calls) | type | name_args | done
        self.calls: list[dict] = []
        self.buf: list[int] = []                  # the current call's ids (its type, then name and arguments)
        self.named = False                        # the current call's name has been sent
        self.type = "function"

    def _text(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def push(self, ids: list[int]) -> tuple[str, list[dict]]:
        """(content delta, tool-call deltas)."""
        content, deltas = [], []
        for t in ids:
            if self.state == "content":
                if t == self.m[CALLS_BEGIN]:
                    self.state = "between"
                else:
                    content.append(t)
            elif self.state == "between":
                if t == self.m[CALL_BEGIN]:
                    self.state, self.buf, self.named = "type", [], False
                elif t == self.m[CALLS_END]:
                    self.state = "done"
            elif self.state == "type":
                if t == self.m[SEP]:
                    self.state, self.type, self.buf = "name_args", self._text(self.buf).strip() or "function", []
                else:
                    self.buf.append(t)
            elif self.state == "name_args":
                if t == self.m[CALL_END]:
                    deltas += self._close()
                    self.state = "between"
                else:
                    self.buf.append(t)
                    text = self._text(self.buf)
                    if not self.named and "\n" in text:  # the name is whole: the call's first delta
                        deltas.append(self._open(text.split("\n", 1)[0].strip()))
        return (self.content.push(content) if content else ""), deltas

    def _open(self, name: str) -> dict:
        self.named = True
        self.calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": self.type,
                           "function": {"name": name, "arguments": ""}})
        return {"index": len(self.calls) - 1, "id": self.calls[-1]["id"], "type": self.type,
                "function": {"name": name, "arguments": ""}}

    def _close(self) -> list[dict]:
        """The call's markers are closed: its arguments (and its name, if no newline came before)."""
        name, args = parse_call(self._text(self.buf))
        out = [] if self.named else [self._open(name)]
        self.named = False
        self.calls[-1]["function"]["arguments"] = args
        out.append({"index": len(self.calls) - 1, "function": {"arguments": args}})
        self.buf = []
        return out

    def flush(self) -> tuple[str, list[dict]]:
        """The end of the output: held-back content, and a call cut off mid-way closed as it stands."""
        deltas = self._close() if self.state == "name_args" and self.buf else []
        return self.content.flush(), deltas

    @property
    def text(self) -> tuple[str | None, list[dict]]:
        """(content, tool calls) of the whole output; content None when it is only tool calls."""
        content = self.content.text
        return (content if content or not self.calls else None), self.calls


def tool_grammar(tools: list[dict], markers: dict, name: str | None = None, parallel: bool = True) -> str:
    """A Lark grammar (llguidance's dialect: `<[id]>` a token, `%json` a JSON schema) for output that is
    only tool calls in V3's format, each call's arguments valid for its function's schema: what
    tool_choice "required" (any of `tools`; one call unless `parallel`) and a named function (that one,
    once) are enforced with."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    rules, alts = [], []
    for k, t in enumerate(chosen):
        f = t["function"]
        schema = f.get("parameters") or {"type": "object"}
        rules.append(f"fn{k}: {json.dumps(f['name'] + chr(10) + '```json' + chr(10))} args{k} \"\\n```\"")
        rules.append(f"args{k}: %json {json.dumps(schema)}")
        alts.append(f"fn{k}")
    more = ' ("\\n" call)*' if parallel and name is None else ""
    return "\n".join([f"start: <[{markers[CALLS_BEGIN]}]> call{more} <[{markers[CALLS_END]}]>",
                      f"call: <[{markers[CALL_BEGIN]}]> \"function\" <[{markers[SEP]}]> ({' | '.join(alts)}) "
                      f"<[{markers[CALL_END]}]>", *rules])
