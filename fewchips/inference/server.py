"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

Routes: GET /health, GET /v1/models, POST /v1/completions (string, string-list, token-id and
token-id-list prompts; logprobs and echo for scoring), POST /v1/chat/completions; `stream: true`
answers with server-sent events ending in `data: [DONE]`. Every error is a 4xx/5xx with
{"error": {"message", "type", "param", "code"}}, the shape the `openai` client raises from.
The engine steps on its own thread; each request's tokens come back to the event loop through a queue.
See shared/reference/openai_api.md for what real clients send.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Request, TokenLogprob
from .sampling import SamplingParams


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status, message, type="invalid_request_error", param=None, code=None):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": type,
                                                               "param": param, "code": code}})


def _validation_message(exc) -> tuple[str, str | None]:
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
    n: int = Field(1, ge=1, le=16)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionBody(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: str = ""


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None


class ChatBody(_Common):
    messages: list[Message]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


async def parse(request: HTTPRequest, model: type[BaseModel]):
    """The JSON body as `model`, whatever the content-type header says; 400 for malformed JSON or
    fields of the wrong type."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        msg, param = _validation_message(e)
        raise APIError(400, msg, param=param) from None


# ---------------------------------------------------------------------------------------------
# Text: incremental detokenisation with stop strings
# ---------------------------------------------------------------------------------------------

class TextStream:
    """Turns a growing list of token ids into text deltas. Holds back an incomplete UTF-8 character
    and any tail that could be the start of a stop string; cuts the text at the first stop string."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def _text(self):
        text = self.tok.decode(self.ids)
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            self.stopped = True
            return text[: min(cuts)], True
        return text, False

    def push(self, ids: list[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text, cut = self._text()
        safe = len(text)
        if not cut:
            while safe > self.sent and text[safe - 1] == "\ufffd":
                safe -= 1
            for s in self.stops:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        out = text[self.sent: safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out

    def flush(self) -> str:
        text, _ = self._text()
        out = text[self.sent:]
        self.sent = len(text)
        return out

    @property
    def text(self) -> str:
        return self._text()[0]


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------

def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="fewchips", docs_url=None, redoc_url=None)
    created = int(time.time())
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else engine.model.config.eos_token_id
    stop_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        msg, param = _validation_message(e)
        return error_response(400, msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            if header != f"Bearer {api_key}":
                return error_response(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                      "authentication_error", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "fewchips", "max_model_len": engine.max_len}]}

    # ---- shared plumbing ----------------------------------------------------------------------
    def check_common(body: _Common):
        if body.model not in (None, "", model_name):
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           "not_found_error", "model", "model_not_found")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")

    def params_for(body: _Common, max_tokens: int, j: int, logprobs: int | None) -> SamplingParams:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        temperature = 1.0 if body.temperature is None else body.temperature
        return SamplingParams(max_tokens=max_tokens, temperature=temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                              seed=None if body.seed is None else body.seed + j, stop=stops,
                              stop_token_ids=stop_ids, logprobs=logprobs)

    def submit(prompts: list[list[int]], body: _Common, max_tokens: list[int], logprobs, prompt_logprobs=None):
        """One engine request per (prompt, choice); all are checked before any is queued."""
        for p, m in zip(prompts, max_tokens):
            try:
                engine.check(p, m)
            except ValueError as e:
                raise APIError(400, str(e), param="messages" if isinstance(body, ChatBody) else "prompt",
                               code="context_length_exceeded" if "context" in str(e) else None) from None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_event(req, kind, payload):
            loop.call_soon_threadsafe(queue.put_nowait, (req, kind, payload))

        reqs = []
        for i, (p, m) in enumerate(zip(prompts, max_tokens)):
            for j in range(body.n):
                reqs.append(Request(p, params_for(body, m, j, logprobs), on_event=on_event,
                                    prompt_logprobs=prompt_logprobs))
        for r in reqs:
            engine.add(r)
        return reqs, queue

    async def collect(reqs, queue, streams):
        """Run non-streaming requests to the end, feeding each choice's tokens to its text stream."""
        async for k, kind, payload in events(reqs, queue):
            if kind == "tokens":
                streams[k].push([x if isinstance(x, int) else x.token for x in payload])
            elif kind == "error":
                raise APIError(500, f"generation failed: {payload}", "server_error")

    async def events(reqs, queue):
        """Yield (choice index, kind, payload) until every request is done; abort leftovers on exit."""
        index = {r.id: k for k, r in enumerate(reqs)}
        open_ = len(reqs)
        try:
            while open_:
                req, kind, payload = await queue.get()
                if kind in ("done", "error"):
                    open_ -= 1
                yield index[req.id], kind, payload
        finally:
            for r in reqs:
                if r.finish_reason is None:
                    engine.abort(r)

    def usage(prompts, reqs):
        p = sum(len(x) for x in prompts)
        c = sum(len(r.output_ids) for r in reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    # ---- /v1/completions ---------------------------------------------------------------------
    def completion_prompts(body: CompletionBody) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str):
            prompts = [tokenizer.encode(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [tokenizer.encode(x) for x in p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]
        else:
            raise APIError(400, "prompt must be a non-empty string, list of strings, list of token ids or "
                                "list of token-id lists", param="prompt")
        if any(len(x) == 0 for x in prompts):
            raise APIError(400, "prompt is empty", param="prompt")
        return prompts

    def logprobs_block(items: list[TokenLogprob | None], offset0: int, token_ids: list[int]):
        tokens, lps, tops, offsets = [], [], [], []
        off = offset0
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

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await parse(request, CompletionBody)
        check_common(body)
        prompts = completion_prompts(body)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        scoring = body.echo and body.logprobs is not None
        reqs, queue = submit(prompts, body, [max_tokens] * len(prompts), body.logprobs,
                             prompt_logprobs=body.logprobs if scoring else None)
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        streams = [TextStream(tokenizer, r.params.stop) for r in reqs]
        prompt_of = [prompts[k // body.n] for k in range(len(reqs))]

        def choice_text(k):
            echo = tokenizer.decode(prompt_of[k], skip_special_tokens=False) if body.echo else ""
            return echo, streams[k].text

        if body.stream:
            async def gen():
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                if body.echo:
                    for k in range(len(reqs)):
                        yield sse({"id": cid, "object": "text_completion", "created": now, "model": model_name,
                                   "choices": [{"index": k, "text": choice_text(k)[0], "logprobs": None,
                                                "finish_reason": None}]})
                async for k, kind, payload in events(reqs, queue):
                    if kind == "error":
                        yield sse({"error": {"message": payload, "type": "server_error", "param": None, "code": None}})
                        continue
                    if kind == "tokens":
                        ids = [x if isinstance(x, int) else x.token for x in payload]
                        delta = streams[k].push(ids)
                        lp = (logprobs_block(payload, 0, ids) if body.logprobs is not None else None)
                        if delta or lp:
                            yield sse({"id": cid, "object": "text_completion", "created": now, "model": model_name,
                                       "choices": [{"index": k, "text": delta, "logprobs": lp, "finish_reason": None}]})
                    else:
                        yield sse({"id": cid, "object": "text_completion", "created": now, "model": model_name,
                                   "choices": [{"index": k, "text": streams[k].flush(), "logprobs": None,
                                                "finish_reason": payload}]})
                if include_usage:
                    yield sse({"id": cid, "object": "text_completion", "created": now, "model": model_name,
                               "choices": [], "usage": usage(prompts, reqs)})
                yield "data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")

        await collect(reqs, queue, streams)
        choices = []
        for k, r in enumerate(reqs):
            echo, text = choice_text(k)
            lp = None
            if body.logprobs is not None:
                items = (r.prompt_logprob_list if body.echo else []) + r.logprobs
                ids = (r.prompt_ids if body.echo else []) + r.output_ids
                lp = logprobs_block(items, 0, ids)
            choices.append({"index": k, "text": echo + text, "logprobs": lp, "finish_reason": r.finish_reason})
        return {"id": cid, "object": "text_completion", "created": now, "model": model_name,
                "choices": choices, "usage": usage(prompts, reqs)}

    # ---- /v1/chat/completions ----------------------------------------------------------------
    def chat_prompt(body: ChatBody) -> list[int]:
        if not body.messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        msgs = []
        for m in body.messages:
            c = m.content
            text = c if isinstance(c, str) else "".join(p.text for p in c or [] if p.type == "text")
            msgs.append({"role": m.role, "content": text})
        try:
            ids = tokenizer.apply_chat_template(msgs)
        except Exception as e:   # the template rejected the conversation (roles out of order, ...)
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        if not ids:
            raise APIError(400, "the conversation is empty", param="messages")
        return ids

    def chat_logprobs(items: list[TokenLogprob]):
        def entry(t, v):
            s = tokenizer.token_text(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode())}
        return {"content": [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, v) for t, v in i.top]}
                            for i in items]}

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await parse(request, ChatBody)
        check_common(body)
        prompt = chat_prompt(body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(engine.max_len - len(prompt), 0)
            if max_tokens == 0:
                raise APIError(400, f"the conversation ({len(prompt)} tokens) fills this model's maximum "
                                    f"context length of {engine.max_len} tokens", param="messages",
                               code="context_length_exceeded")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        reqs, queue = submit([prompt], body, [max_tokens], logprobs)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        streams = [TextStream(tokenizer, r.params.stop) for r in reqs]

        if body.stream:
            async def gen():
                include_usage = bool(body.stream_options and body.stream_options.include_usage)

                def chunk(k, delta, finish=None, lp=None):
                    return sse({"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                                "choices": [{"index": k, "delta": delta, "logprobs": lp, "finish_reason": finish}]})
                for k in range(len(reqs)):
                    yield chunk(k, {"role": "assistant", "content": ""})
                async for k, kind, payload in events(reqs, queue):
                    if kind == "error":
                        yield sse({"error": {"message": payload, "type": "server_error", "param": None, "code": None}})
                    elif kind == "tokens":
                        delta = streams[k].push([x if isinstance(x, int) else x.token for x in payload])
                        lp = chat_logprobs(payload) if logprobs is not None else None
                        if delta or lp:
                            yield chunk(k, {"content": delta}, lp=lp)
                    else:
                        rest = streams[k].flush()
                        if rest:
                            yield chunk(k, {"content": rest})
                        yield chunk(k, {}, finish=payload)
                if include_usage:
                    yield sse({"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                               "choices": [], "usage": usage([prompt], reqs)})
                yield "data: [DONE]\n\n"
            return StreamingResponse(gen(), media_type="text/event-stream")

        await collect(reqs, queue, streams)
        choices = [{"index": k, "message": {"role": "assistant", "content": streams[k].text},
                    "logprobs": chat_logprobs(r.logprobs) if logprobs is not None else None,
                    "finish_reason": r.finish_reason} for k, r in enumerate(reqs)]
        return {"id": cid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": choices, "usage": usage([prompt], reqs)}

    return app


def serve(engine: Engine, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, log_level: str = "info"):
    import uvicorn
    engine.start()
    try:
        uvicorn.run(create_app(engine, tokenizer, model_name, api_key), host=host, port=port, log_level=log_level)
    finally:
        engine.stop()
