"""The OpenAI API as the server speaks it: request bodies and their checks, prompts built from them,
sampling parameters, and the response pieces (logprob blocks, usage, server-sent events). Plain
functions of a body and a tokenizer, no HTTP: `server.py` wires them to routes.

What real clients send: `prompt` as a string, a list of strings, a list of token ids or a list of
token-id lists (evaluation harnesses score with the last form, `echo` and `logprobs`); chat `messages`
whose `content` is a string or a list of text parts; vLLM's extra sampling fields (`min_p`,
`repetition_penalty`, `stop_token_ids`, `min_tokens`, `ignore_eos`, `include_stop_str_in_output`,
`skip_special_tokens`, `chat_template_kwargs`); output constraints (`response_format` json_object and
json_schema, vLLM's `structured_outputs` and `guided_*`: `output_constraint`). A field fewchips cannot
honour is refused by name (400); a field it does not know is accepted and named in the server's log, as
vLLM does.
"""

from __future__ import annotations

import json
import logging
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .request import TokenLogprob
from .sampling import MAX_TOKENS, SamplingParams

INT64 = 2**63
log = logging.getLogger("fewchips.server")


class APIError(Exception):
    """An OpenAI-style error: HTTP status and {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_message(exc) -> tuple[str, str | None]:
    """The first pydantic error as one line, and the top-level field it is about."""
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    where = ".".join(loc)
    return (f"{where}: {e.get('msg')}" if where else str(e.get("msg"))), (loc[0] if loc else None)


# ---------------------------------------------------------------------------------------------
# Request bodies (unknown fields are accepted; known fields must have the right types)
# ---------------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's sampling fields
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # output constraints (structured outputs): response_format below, and vLLM's fields
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # what fewchips does not do: accepted only in their do-nothing form
    tools: list | None = None
    functions: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None     # text, json_object or json_schema (output_constraint)
    best_of: int | None = None
    priority: int = 0


class CompletionBody(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(MAX_TOKENS, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: str = ""


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict] | None = None          # an assistant turn's calls: [{id, type, function: {name, arguments}}]
    tool_call_id: str | None = None               # a tool turn: the call it answers
    name: str | None = None


class ChatBody(_Common):
    messages: list[Message]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict | None = None


class TokenizeBody(BaseModel):
    """vLLM's /tokenize: a completion prompt, or chat messages rendered by the template."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool | None = None          # default: True for a prompt, False for messages (vLLM's)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict | None = None
    tools: list | None = None
    return_token_strs: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]


def parse_body(raw: bytes, model: type[BaseModel]):
    """The JSON body as `model` (whatever the content-type header says); 400 for malformed JSON or
    fields of the wrong type."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        msg, param = validation_message(e)
        raise APIError(400, msg, param=param) from None


def check_common(body: _Common, model_name: str, vocab_size: int, max_n: int, tool_parser: bool = False):
    """What every endpoint refuses: another model, too many choices, fields fewchips cannot honour,
    a logit_bias naming tokens that do not exist. `tool_parser`: the server reads tool calls (chat only)."""
    if body.model not in (None, "", model_name):
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                       "not_found_error", "model", "model_not_found")
    if body.n > max_n:
        raise APIError(400, f"n is {body.n}; this server returns at most {max_n} choices per prompt", param="n")
    if body.functions:
        raise APIError(400, "functions (the legacy form) is not supported; send tools", param="functions")
    check_tools(body, tool_parser and isinstance(body, ChatBody))
    if body.best_of not in (None, body.n):
        raise APIError(400, f"best_of {body.best_of} (ranking more samples than are returned) is not supported; "
                            f"ask for n choices instead", param="best_of")
    if body.priority:
        raise APIError(400, "priority is not supported: requests are served first come, first served",
                       param="priority")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options applies only with stream: true", param="stream_options")
    if getattr(body, "suffix", None):
        raise APIError(400, "suffix (text after the completion) is not supported", param="suffix")
    if isinstance(body, ChatBody):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        for m in body.messages:
            for part in m.content if isinstance(m.content, list) else []:
                if part.type != "text":
                    raise APIError(400, f"content part of type {part.type!r}: this model takes text only",
                                   param="messages")
    for t in body.stop_token_ids or []:
        if not 0 <= t < vocab_size:
            raise APIError(400, f"stop_token_ids: {t} is not a token id in [0, {vocab_size})", param="stop_token_ids")
    for key, bias in (body.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise APIError(400, f"logit_bias: {key!r} is not a token id in [0, {vocab_size})", param="logit_bias")
        if not -100 <= bias <= 100:
            raise APIError(400, f"logit_bias: the bias of token {key} is {bias}; allowed: -100 to 100",
                           param="logit_bias")


# vLLM's structured_outputs keys -> our constraint kinds
STRUCTURED = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
              "json_object": "json_object"}


def output_constraint(body: _Common) -> dict | None:
    """The one constraint a request puts on its output, as {kind, spec, param, lenient, compact}: kind one of
    grammar.KINDS, param the request field it came from (for errors), lenient for a json_schema with strict
    false (keywords llguidance cannot enforce are dropped, not refused), compact for vLLM's
    disable_any_whitespace. None when there is none; two or more are a 400."""
    found = []
    fmt = body.response_format
    if fmt is not None:
        kind = fmt.get("type", "text")
        if kind == "json_object":
            found.append({"kind": "json_object", "spec": None, "param": "response_format"})
        elif kind == "json_schema":
            js = fmt.get("json_schema")
            if not isinstance(js, dict) or "schema" not in js:
                raise APIError(400, "response_format json_schema needs json_schema: {name, schema, strict}",
                               param="response_format")
            found.append({"kind": "json_schema", "spec": js["schema"], "param": "response_format",
                          "lenient": not js.get("strict")})
        elif kind != "text":
            raise APIError(400, f"response_format {kind!r} is not supported; text, json_object or json_schema",
                           param="response_format")
    so = body.structured_outputs or {}
    compact = bool(so.get("disable_any_whitespace"))
    for key, value in so.items():
        if key == "disable_any_whitespace" or value is None or (key == "json_object" and value is False):
            continue
        if key not in STRUCTURED:
            raise APIError(400, f"structured_outputs.{key} is not supported; one of {', '.join(STRUCTURED)} "
                                "(and disable_any_whitespace)", param="structured_outputs")
        found.append({"kind": STRUCTURED[key], "spec": value, "param": "structured_outputs"})
    for kind, name in (("json_schema", "guided_json"), ("regex", "guided_regex"), ("choice", "guided_choice"),
                       ("grammar", "guided_grammar")):
        if getattr(body, name) is not None:
            found.append({"kind": kind, "spec": getattr(body, name), "param": name})
    if len(found) > 1:
        raise APIError(400, f"one output constraint per request; this one sets {', '.join(c['param'] for c in found)}"
                       f" ({', '.join(c['kind'] for c in found)})", param=found[1]["param"])
    return {"lenient": False, **found[0], "compact": compact} if found else None


def check_tools(body: _Common, tool_parser: bool):
    """tools as OpenAI defines them, a tool_choice among them; tools need the server's tool-call parser."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
        return
    if not tool_parser:
        raise APIError(400, "tools need a chat endpoint on a server that reads tool calls (fewchips serve "
                            "--tool-call-parser deepseek_v3, for a model whose chat template writes them)",
                       param="tools")
    names = []
    for i, t in enumerate(body.tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(f, dict) \
                or not isinstance(f.get("name"), str) or not isinstance(f.get("parameters", {}), dict):
            raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": str, "
                                f"\"parameters\": JSON schema}}}}", param="tools")
        names.append(f["name"])
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or name not in names:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools ({', '.join(names)})",
                           param="tool_choice")
    elif choice not in (None, "none", "auto", "required"):
        raise APIError(400, f"tool_choice {choice!r}: none, auto, required or {{\"type\": \"function\", ...}}",
                       param="tool_choice")
    if choice not in (None, "none", "auto") and output_constraint(body) is not None:
        raise APIError(400, "tool_choice required or named is itself an output constraint: drop response_format or "
                            "the structured_outputs/guided_* fields", param="tool_choice")


def tool_mode(body) -> str | None:
    """How a chat request uses tools: None (none given, or tool_choice none), "auto", "required" or the
    named function."""
    if not getattr(body, "tools", None) or body.tool_choice == "none":
        return None
    if isinstance(body.tool_choice, dict):
        return body.tool_choice["function"]["name"]
    return body.tool_choice or "auto"


def warn_unknown(body: BaseModel, endpoint: str):
    """Fields this server does not know: accepted (clients send extras), named in the log."""
    if body.model_extra:
        log.warning(f"{endpoint}: ignored fields not known to this server: {', '.join(sorted(body.model_extra))}")


# the defaults a model's generation_config.json may set, and OpenAI's where it does not
DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def sampling_params(body: _Common, max_tokens: int, choice: int, logprobs: int | None,
                    stop_ids: list[int], defaults: dict | None = None) -> SamplingParams:
    """The engine's parameters for one choice; choice j of a seeded request draws with seed + j. A field
    the request sets wins, then the model's `defaults` (generation_config.json), then OpenAI's."""
    given = body.model_fields_set

    def pick(name):
        value = getattr(body, name) if name in given else None
        return value if value is not None else (defaults or {}).get(name, DEFAULTS[name])
    eos = [] if body.ignore_eos else stop_ids
    return SamplingParams(
        max_tokens=max_tokens, temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k") or 0,
        min_p=pick("min_p"), repetition_penalty=pick("repetition_penalty"), min_tokens=body.min_tokens,
        seed=None if body.seed is None else body.seed + choice,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        stop_token_ids=eos + [t for t in body.stop_token_ids or [] if t not in eos],
        logprobs=logprobs, frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()})


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

def completion_prompts(body: CompletionBody, tokenizer, max_prompts: int) -> tuple[list[list[int]], list[str | None]]:
    """Token ids of each prompt, and each prompt's text as the client sent it (None for token ids)."""
    p, texts, ids = body.prompt, None, None
    if isinstance(p, str):
        texts = [p]
    elif p and all(isinstance(x, str) for x in p):
        texts = list(p)
    elif p and all(isinstance(x, int) for x in p):
        ids = [list(p)]
    elif p and all(isinstance(x, list) for x in p):
        ids = [list(x) for x in p]
    else:
        raise APIError(400, "prompt must be a non-empty string, list of strings, list of token ids or "
                            "list of token-id lists", param="prompt")
    n = len(texts if texts is not None else ids)
    if n > max_prompts:
        raise APIError(400, f"{n} prompts in one request; this server takes at most {max_prompts}", param="prompt")
    if ids is None:
        ids = [tokenizer.encode(t) for t in texts]
    else:
        texts = [None] * len(ids)
    if any(len(x) == 0 for x in ids):
        raise APIError(400, "prompt is empty", param="prompt")
    return ids, texts


def template_messages(messages: list[Message]) -> list[dict]:
    """Messages as the chat template reads them: every field, as transformers passes them (text parts
    joined; an assistant turn's null content beside its tool_calls kept null)."""
    out = []
    for m in messages:
        c = m.content
        text = c if isinstance(c, str) or (c is None and m.tool_calls) else \
            "".join(part.text for part in c or [] if part.type == "text")
        out.append({"role": m.role, "content": text,
                    **{k: getattr(m, k) for k in ("tool_calls", "tool_call_id", "name") if getattr(m, k) is not None}})
    return out


def chat_prompt(body: ChatBody, tokenizer) -> list[int]:
    if not body.messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    msgs = template_messages(body.messages)
    variables = dict(body.chat_template_kwargs or {})
    if body.tools:
        variables["tools"] = body.tools
    try:
        ids = tokenizer.apply_chat_template(msgs, **variables)
    except Exception as e:   # the template rejected the conversation (roles out of order, ...)
        raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
    if not ids:
        raise APIError(400, "the conversation is empty", param="messages")
    return ids


def _same_model(name: str | None, model_name: str):
    if name not in (None, "", model_name):
        raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                       "not_found_error", "model", "model_not_found")


def tokenize(raw: bytes, tokenizer, model_name: str, max_model_len: int) -> dict:
    """vLLM's /tokenize answer: {count, max_model_len, tokens, token_strs}."""
    body = parse_body(raw, TokenizeBody)
    _same_model(body.model, model_name)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give prompt (text) or messages (a conversation), one of them", param="prompt")
    if body.prompt is not None:
        ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    else:
        variables = {**(body.chat_template_kwargs or {}), **({"tools": body.tools} if body.tools else {})}
        try:
            ids = tokenizer.apply_chat_template(template_messages(body.messages),
                                                add_generation_prompt=body.add_generation_prompt, **variables)
        except Exception as e:
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids,
            "token_strs": [tokenizer.token_text(t) for t in ids] if body.return_token_strs else None}


def detokenize(raw: bytes, tokenizer, model_name: str, vocab_size: int) -> dict:
    """vLLM's /detokenize answer: {prompt}."""
    body = parse_body(raw, DetokenizeBody)
    _same_model(body.model, model_name)
    bad = [t for t in body.tokens if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"tokens: {bad[0]} is not a token id in [0, {vocab_size})", param="tokens")
    return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}


# ---------------------------------------------------------------------------------------------
# Response pieces
# ---------------------------------------------------------------------------------------------

def completion_logprobs(tokenizer, items: list[TokenLogprob | None], token_ids: list[int]) -> dict:
    """The legacy `logprobs` block: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, lps, tops, offsets = [], [], [], []
    off = 0
    for t, item in zip(token_ids, items):
        text = tokenizer.token_text(t)
        tokens.append(text)
        offsets.append(off)
        off += len(text)
        if item is None:
            lps.append(None)
            tops.append(None)
        else:
            lps.append(item.logprob)
            top = {tokenizer.token_text(i): v for i, v in item.top}
            if item.top:
                top.setdefault(text, item.logprob)
            tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, items: list[TokenLogprob]) -> dict:
    def entry(t, v):
        s = tokenizer.token_text(t)
        return {"token": s, "logprob": v, "bytes": list(s.encode())}
    return {"content": [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, v) for t, v in i.top]}
                        for i in items]}


def usage(prompts: list[list[int]], reqs) -> dict:
    """OpenAI's usage block; `cached_tokens` are prompt tokens the prefix cache supplied (for n choices of
    a prompt, what every choice found cached)."""
    p = sum(len(x) for x in prompts)
    c = sum(len(r.output_ids) for r in reqs)
    n = max(len(reqs) // max(len(prompts), 1), 1)
    cached = sum(min(getattr(r, "cached_tokens", 0) for r in reqs[i:i + n]) for i in range(0, len(reqs), n))
    out = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
           "prompt_tokens_details": {"cached_tokens": cached}}
    drafted = sum(getattr(r, "drafted", 0) for r in reqs)
    if drafted:           # MTP drafts the engine verified: OpenAI's predicted-output counts are the nearest field
        accepted = sum(r.accepted for r in reqs)
        out["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                            "rejected_prediction_tokens": drafted - accepted}
    return out


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"
