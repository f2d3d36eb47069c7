"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

Routes: GET /health (503 when the engine is not running), GET /v1/models, POST /v1/completions,
POST /v1/chat/completions, and vLLM's POST /tokenize and /detokenize; `stream: true` answers with
server-sent events ending in `data: [DONE]`. Every error is a 4xx/5xx with
{"error": {"message", "type", "param", "code"}}, the shape the `openai` client raises from. What a
request may be and become (bodies, prompts, sampling, response pieces) is `openai_api.py`; this module
is the HTTP side: limits, routes, and the loop that turns engine events into responses.

The engine steps on its own thread; each request's tokens come back to the event loop through a queue.
Bodies are read with a size cap and parsed, tokenised and their output constraint compiled (`grammar.py`)
on a worker thread, so the event loop (and /health) stays responsive whatever a client sends.
`ServerLimits` bounds what one client can ask for.
/metrics serves the engine's Prometheus metrics (unauthenticated, as vLLM's: bind to localhost or
firewall it).
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import openai_api as api
from .engine import Engine, Request
from .grammar import Grammar
from .openai_api import APIError, ChatBody, CompletionBody
from .server_limits import ServerLimits
from .reasoning import ReasoningSplit
from .tool_calls import ToolCallStream, marker_ids, tool_grammar
from .tokenizer import TextStream


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(status_code=e.status, content=e.body(), headers=e.headers)


async def read_body(request: HTTPRequest, max_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it passes `max_bytes` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"the request body is {int(declared):,} bytes; this server takes at most {max_bytes:,}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"the request body is over {max_bytes:,} bytes, the most this server takes",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class RequireAPIKey:
    """`Authorization: Bearer KEY` on /v1 routes. Plain ASGI rather than `@app.middleware("http")`, whose
    wrapper hides a client's hang-up from `request.is_disconnected()`."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            if dict(scope["headers"]).get(b"authorization", b"") != self.expected:
                response = error_response(APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                                   "authentication_error", code="invalid_api_key"))
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class Session:
    """One HTTP request's generations: submitted together, their events read back in order."""

    def __init__(self, app_state, reqs: list[Request], queue: asyncio.Queue, http: HTTPRequest, body):
        self.state, self.reqs, self.queue, self.http = app_state, reqs, queue, http
        tok, skip, keep = app_state.tokenizer, body.skip_special_tokens, body.include_stop_str_in_output
        chat = isinstance(body, ChatBody)
        tools = chat and app_state.tool_markers and api.tool_mode(body)

        def content(r):
            return ToolCallStream(tok, app_state.tool_markers, r.params.stop, skip, keep) if tools \
                else TextStream(tok, r.params.stop, skip, keep)
        if chat and app_state.reasoning and (not tools or ReasoningSplit(tok, []).end_id is not None):
            # reasoning first, then the content (tool calls read in it): on token ids where </think> is one
            self.streams = [ReasoningSplit(tok, r.params.stop, skip, keep, r.prompt_ids,
                                           content(r) if tools else None) for r in reqs]
        else:
            self.streams = [content(r) for r in reqs]

    async def events(self, watch_disconnect: bool):
        """(choice index, kind, payload) until every generation is done. Leaving early (the client hung
        up, the task was cancelled) aborts what is left, which frees their cache slots."""
        index = {r.id: k for k, r in enumerate(self.reqs)}
        open_ = len(self.reqs)
        poll = self.state.limits.disconnect_poll_s
        checked = time.monotonic()
        try:
            while open_:
                try:
                    req, kind, payload = await asyncio.wait_for(self.queue.get(), poll)
                except asyncio.TimeoutError:
                    req = None
                if watch_disconnect and time.monotonic() - checked >= poll:
                    checked = time.monotonic()
                    if await self.http.is_disconnected():
                        return
                if req is None:
                    continue
                if kind in ("done", "error"):
                    open_ -= 1
                yield index[req.id], kind, payload
        finally:
            for r in self.reqs:
                if r.finish_reason is None:
                    self.state.engine.abort(r)

    async def collect(self):
        """Run to the end (non-streaming), feeding each choice's tokens to its text stream."""
        async for k, kind, payload in self.events(watch_disconnect=True):
            if kind == "tokens":
                self.streams[k].push([x if isinstance(x, int) else x.token for x in payload])
            elif kind == "error":
                raise APIError(500, f"generation failed: {payload}", "server_error")
        if any(r.finish_reason is None or r.finish_reason == "abort" for r in self.reqs):
            raise APIError(499, "the client closed the connection", code="client_closed_request")

    async def sse(self, first_chunks, delta, finish, usage_chunk):
        """The one streaming loop of both endpoints: `first_chunks` (a list), then `delta(k, text, payload)`
        per token event (None: nothing to send), `finish(k, rest, reason)` (a list) per ended choice,
        `usage_chunk()` if asked for, then [DONE]."""
        for obj in first_chunks:
            yield api.sse(obj)
        async for k, kind, payload in self.events(watch_disconnect=False):
            if kind == "error":
                yield api.sse({"error": {"message": payload, "type": "server_error", "param": None, "code": None}})
            elif kind == "tokens":
                obj = delta(k, self.streams[k].push([x if isinstance(x, int) else x.token for x in payload]), payload)
                if obj is not None:
                    yield api.sse(obj)
            else:
                for obj in finish(k, self.streams[k].flush(), payload):
                    yield api.sse(obj)
        if usage_chunk is not None:
            yield api.sse(usage_chunk())
        yield "data: [DONE]\n\n"


@dataclass
class AppState:
    engine: Engine
    tokenizer: object
    model_name: str
    limits: ServerLimits
    stop_ids: list[int]
    created: int
    defaults: dict             # sampling defaults from the model's generation_config.json (openai_api.DEFAULTS' keys)
    reasoning: bool = False    # chat replies split at </think> into reasoning_content and content (deepseek_r1)
    tool_markers: dict | None = None   # the tool-call markers' ids when the server reads tool calls (deepseek_v3)

    def submit(self, prompts: list[list[int]], body, max_tokens: list[int], logprobs, http: HTTPRequest,
               prompt_logprobs=None, grammar: Grammar | None = None) -> Session:
        """One engine request per (prompt, choice): all are checked, and the queue's room, before any is queued.
        Each gets its own matcher of `grammar` (structured outputs)."""
        param = "messages" if isinstance(body, ChatBody) else "prompt"
        for p, m in zip(prompts, max_tokens):
            try:
                self.engine.check(p, m)
            except ValueError as e:
                raise APIError(400, str(e), param=param,
                               code="context_length_exceeded" if "context" in str(e) else None) from None
        n_new, limit = len(prompts) * body.n, self.limits.max_waiting
        if n_new > limit:
            raise APIError(400, f"this request asks for {n_new} generations (prompts x n); the most one request "
                                f"may queue is {limit}", param=param)
        if len(self.engine.waiting) + n_new > limit:
            raise APIError(429, f"the server is busy ({len(self.engine.waiting)} generations waiting for a slot); "
                                f"retry shortly", "rate_limit_error", code="server_busy", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_event(req, kind, payload):
            loop.call_soon_threadsafe(queue.put_nowait, (req, kind, payload))

        reqs = [Request(p, api.sampling_params(body, m, j, logprobs, self.stop_ids, self.defaults), on_event=on_event,
                        prompt_logprobs=prompt_logprobs, grammar=grammar.start() if grammar is not None else None)
                for p, m in zip(prompts, max_tokens) for j in range(body.n)]
        for r in reqs:
            self.engine.add(r)
        return Session(self, reqs, queue, http, body)


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
               limits: ServerLimits | None = None, defaults: dict | None = None,
               allowed_origins: list[str] | None = None, reasoning: bool = False,
               tool_parser: bool = False) -> FastAPI:
    """`defaults`: sampling defaults (generation_config.json's); `allowed_origins`: CORS, off when None;
    `reasoning`: split chat replies at </think> (`reasoning.ReasoningSplit`); `tool_parser`: read V3's tool
    calls from chat replies (`tool_calls.ToolCallStream`; the tokenizer must hold the markers)."""
    app = FastAPI(title="fewchips", docs_url=None, redoc_url=None)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else engine.model.config.eos_token_id
    state = AppState(engine, tokenizer, model_name, limits or ServerLimits(),
                     [] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), int(time.time()),
                     dict(defaults or {}), reasoning)
    if tool_parser:
        state.tool_markers = marker_ids(tokenizer)
        if state.tool_markers is None:
            raise ValueError("the tool-call parser deepseek_v3 needs DeepSeek-V3's tool-call tokens, which this "
                             "tokenizer lacks")
    add_error_handlers(app)

    if api_key:
        app.add_middleware(RequireAPIKey, api_key=api_key)
    if allowed_origins:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"])

    @app.get("/health")
    async def health():
        body = {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting)}
        if not engine.is_running:                  # stopped, or its thread died: a load balancer should move on
            return JSONResponse(status_code=503, content={**body, "status": "the engine is not running"})
        return body

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        """vLLM's: {prompt} or {messages, add_generation_prompt, chat_template_kwargs} -> {count, max_model_len,
        tokens, token_strs}."""
        raw = await read_body(request, state.limits.max_body_bytes)
        return await run_in_threadpool(api.tokenize, raw, state.tokenizer, state.model_name, engine.max_len)

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        raw = await read_body(request, state.limits.max_body_bytes)
        return await run_in_threadpool(api.detokenize, raw, state.tokenizer, state.model_name,
                                       engine.model.config.vocab_size)

    @app.get("/metrics")
    async def metrics():
        """Prometheus text format: the engine's counters, gauges and latency histograms (inference.metrics)."""
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": state.created,
                                            "owned_by": "fewchips", "max_model_len": engine.max_len}]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        raw = await read_body(request, state.limits.max_body_bytes)
        body, prompts, texts, grammar = await run_in_threadpool(prepare_completion, raw, state)
        return await complete(state, request, body, prompts, texts, grammar)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        raw = await read_body(request, state.limits.max_body_bytes)
        body, prompt, grammar = await run_in_threadpool(prepare_chat, raw, state)
        return await chat_complete(state, request, body, prompt, grammar)

    return app


def add_error_handlers(app: FastAPI):
    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        msg, param = api.validation_message(e)
        return error_response(APIError(400, msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, str(e.detail), kind))

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))


# ---------------------------------------------------------------------------------------------
# The two endpoints (parsing on a worker thread; generation and responses on the event loop)
# ---------------------------------------------------------------------------------------------

def prepare_completion(raw: bytes, state: AppState):
    body = api.parse_body(raw, CompletionBody)
    api.warn_unknown(body, "/v1/completions")
    api.check_common(body, state.model_name, state.engine.model.config.vocab_size, state.limits.max_n,
                     state.tool_markers is not None)
    prompts, texts = api.completion_prompts(body, state.tokenizer, state.limits.max_prompts)
    return body, prompts, texts, compile_constraint(body, state)


def prepare_chat(raw: bytes, state: AppState):
    body = api.parse_body(raw, ChatBody)
    api.warn_unknown(body, "/v1/chat/completions")
    api.check_common(body, state.model_name, state.engine.model.config.vocab_size, state.limits.max_n,
                     state.tool_markers is not None)
    prompt = api.chat_prompt(body, state.tokenizer)
    mode = api.tool_mode(body)
    if mode not in (None, "auto"):                 # required or a named function: the calls' format enforced
        lark = tool_grammar(body.tools, state.tool_markers, None if mode == "required" else mode,
                            parallel=body.parallel_tool_calls is not False)
        try:
            grammar = Grammar("grammar", lark, state.tokenizer, state.engine.model.config.vocab_size,
                              state.stop_ids, lenient=True)
        except ValueError as e:
            raise APIError(400, f"tools: a function's parameters do not compile as a JSON schema: {e}",
                           param="tools") from None
        return body, prompt, after_reasoning(grammar, body, state, prompt, "tool_choice")
    return body, prompt, compile_constraint(body, state, prompt)


def compile_constraint(body, state: AppState, prompt: list[int] | None = None) -> Grammar | None:
    """The request's output constraint (`api.output_constraint`) compiled once, or None; one that does not
    compile is a 400 naming its field. With the reasoning parser on, a chat's constraint applies after the
    `</think>` token (vLLM's default), or from the start when the prompt has closed the reasoning already."""
    c = api.output_constraint(body)
    if c is None:
        return None
    try:
        grammar = Grammar(c["kind"], c["spec"], state.tokenizer, state.engine.model.config.vocab_size,
                          state.stop_ids, lenient=c["lenient"], compact=c["compact"])
    except ValueError as e:
        raise APIError(400, f"{c['param']}: the {c['kind']} constraint does not compile: {e}",
                       param=c["param"]) from None
    if grammar.warnings:
        api.log.warning(f"{c['param']}: not enforced (strict is false): {'; '.join(grammar.warnings)}")
    return after_reasoning(grammar, body, state, prompt, c["param"])


def after_reasoning(grammar: Grammar, body, state: AppState, prompt: list[int] | None, param: str) -> Grammar:
    """With the reasoning parser on, a chat's constraint applies after the `</think>` token (vLLM's
    default), or from the start when the prompt has closed the reasoning already."""
    if state.reasoning and isinstance(body, ChatBody):
        split = ReasoningSplit(state.tokenizer, [], prompt=prompt)
        if split.end_id is None:
            raise APIError(400, f"{param}: with the reasoning parser on, a constraint applies after </think>, "
                                "which this tokenizer does not hold as one token", param=param)
        if not split.ended:
            grammar.after = split.end_id
    return grammar


async def complete(state: AppState, request: HTTPRequest, body: CompletionBody, prompts, texts,
                   grammar: Grammar | None = None):
    max_tokens = body.max_tokens if "max_tokens" in body.model_fields_set and body.max_tokens is not None \
        else max(0, min(state.defaults.get("max_tokens", api.MAX_TOKENS),
                        state.engine.max_len - max(len(p) for p in prompts)))   # a default fits the context
    scoring = body.echo and body.logprobs is not None
    s = state.submit(prompts, body, [max_tokens] * len(prompts), body.logprobs, request,
                     prompt_logprobs=body.logprobs if scoring else None, grammar=grammar)
    cid, now, tok = f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.tokenizer

    def echo(k):          # the prompt as the client sent it: its own text, or its token ids decoded
        i = k // body.n
        return texts[i] if texts[i] is not None else tok.decode(prompts[i], skip_special_tokens=False)

    def obj(choices, **extra):
        return {"id": cid, "object": "text_completion", "created": now, "model": state.model_name,
                "choices": choices, **extra}

    if body.stream:
        def delta(k, text, payload):
            lp = None
            if body.logprobs is not None:
                lp = api.completion_logprobs(tok, payload, [x if isinstance(x, int) else x.token for x in payload])
            return obj([{"index": k, "text": text, "logprobs": lp, "finish_reason": None}]) if text or lp else None

        first = [obj([{"index": k, "text": echo(k), "logprobs": None, "finish_reason": None}])
                 for k in range(len(s.reqs))] if body.echo else []
        finish = lambda k, rest, reason: [obj([{"index": k, "text": rest, "logprobs": None,     # noqa: E731
                                                "finish_reason": reason}])]
        usage = ((lambda: obj([], usage=api.usage(prompts, s.reqs)))
                 if body.stream_options and body.stream_options.include_usage else None)
        return StreamingResponse(s.sse(first, delta, finish, usage), media_type="text/event-stream")

    await s.collect()
    choices = []
    for k, r in enumerate(s.reqs):
        lp = None
        if body.logprobs is not None:
            items = (r.prompt_logprob_list if body.echo else []) + r.logprobs
            lp = api.completion_logprobs(tok, items, (r.prompt_ids if body.echo else []) + r.output_ids)
        text = (echo(k) if body.echo else "") + s.streams[k].text
        choices.append({"index": k, "text": text, "logprobs": lp, "finish_reason": r.finish_reason})
    return obj(choices, usage=api.usage(prompts, s.reqs))


async def chat_complete(state: AppState, request: HTTPRequest, body: ChatBody, prompt: list[int],
                        grammar: Grammar | None = None):
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None and "max_tokens" in state.defaults:   # the model's default, within the room left (vLLM)
        max_tokens = min(state.defaults["max_tokens"], state.engine.max_len - len(prompt)) or None
    if max_tokens is None:
        max_tokens = max(state.engine.max_len - len(prompt), 0)
        if max_tokens == 0:
            raise APIError(400, f"the conversation ({len(prompt)} tokens) fills this model's maximum context "
                                f"length of {state.engine.max_len} tokens", param="messages",
                           code="context_length_exceeded")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    s = state.submit([prompt], body, [max_tokens], logprobs, request, grammar=grammar)
    cid, now, tok = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.tokenizer

    def chunk(k, delta, finish=None, lp=None):
        return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": state.model_name,
                "choices": [{"index": k, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

    split = isinstance(s.streams[0], ReasoningSplit)
    calls_of = [(st.content_ids if split else st) for st in s.streams]
    tools = isinstance(calls_of[0], ToolCallStream)

    def reason(k, r):                              # a choice that ended in its tool calls says so
        return "tool_calls" if tools and calls_of[k].calls and r == "stop" else r

    def parts(text) -> tuple:
        """A stream's output as (reasoning, content, tool calls)."""
        reasoning, text = text if split else (None, text)
        content, calls = text if tools else (text, [])
        return reasoning, content, calls

    def message_delta(text) -> dict:
        """A delta as the message's fields: reasoning (parser on), content, tool calls (tools given)."""
        reasoning, content, calls = parts(text)
        return {**({"reasoning_content": reasoning, "reasoning": reasoning} if reasoning else {}),
                **({"content": content} if content else {}), **({"tool_calls": calls} if calls else {})}

    if body.stream:
        def delta(k, text, payload):
            lp = api.chat_logprobs(tok, payload) if logprobs is not None else None
            d = message_delta(text)
            return chunk(k, d, lp=lp) if d or lp else None

        def finish(k, rest, r):
            d = message_delta(rest)
            return ([chunk(k, d)] if d else []) + [chunk(k, {}, finish=reason(k, r))]

        usage = ((lambda: {"id": cid, "object": "chat.completion.chunk", "created": now, "model": state.model_name,
                           "choices": [], "usage": api.usage([prompt], s.reqs)})
                 if body.stream_options and body.stream_options.include_usage else None)
        first = [chunk(k, {"role": "assistant", "content": ""}) for k in range(len(s.reqs))]
        return StreamingResponse(s.sse(first, delta, finish, usage), media_type="text/event-stream")

    def message(k) -> dict:
        text = s.streams[k].text
        if split and tools and text[1] is None:      # no </think>: no content, no calls
            text = (text[0], (None, []))
        reasoning, content, calls = parts(text)
        return {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {}),
                **({"reasoning_content": reasoning, "reasoning": reasoning} if split else {})}

    await s.collect()
    choices = [{"index": k, "message": message(k),
                "logprobs": api.chat_logprobs(tok, r.logprobs) if logprobs is not None else None,
                "finish_reason": reason(k, r.finish_reason)} for k, r in enumerate(s.reqs)]
    return {"id": cid, "object": "chat.completion", "created": now, "model": state.model_name,
            "choices": choices, "usage": api.usage([prompt], s.reqs)}


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now (before a model is loaded), so that a bad --host or a
    port in use is one line and not a server that announces itself and then fails."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET      # as uvicorn picks it
        return socket.create_server((host, port), family=family, backlog=2048)
    except (OSError, OverflowError) as e:
        raise ValueError(f"cannot listen on --host {host} --port {port}: {getattr(e, 'strerror', None) or e}") from None


def serve(engine: Engine, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, log_level: str = "info", limits: ServerLimits | None = None,
          sock: socket.socket | None = None, defaults: dict | None = None, allowed_origins: list[str] | None = None,
          reasoning: bool = False, tool_parser: bool = False):
    """Run until SIGINT/SIGTERM: then stop accepting, give in-flight requests `limits.shutdown_timeout`
    seconds to finish, cancel the rest (which aborts their generations), stop the engine. `sock`: a socket
    from `listen` (else host and port are bound here)."""
    import uvicorn
    limits = limits or ServerLimits()
    sock = sock or listen(host, port)
    engine.start()
    try:
        app = create_app(engine, tokenizer, model_name, api_key, limits, defaults, allowed_origins, reasoning,
                         tool_parser)
        config = uvicorn.Config(app, host=host, port=port,
                                log_level=log_level, timeout_graceful_shutdown=limits.shutdown_timeout)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
