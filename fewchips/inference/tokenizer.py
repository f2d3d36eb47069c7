"""A model directory's tokenizer: `tokenizer.json` through the `tokenizers` library, plus the chat
template and special tokens of `tokenizer_config.json` when present; and `TextStream`, generated ids
turned into text deltas (what the server streams and `fewchips chat` prints)."""

from __future__ import annotations

import json
import os


def _token_text(v):
    return v.get("content") if isinstance(v, dict) else v


def _raise(message):
    raise ValueError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' `tojson` (Jinja's own escapes <, >, & and ' for HTML: tool schemas would differ)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    import datetime
    return datetime.datetime.now().strftime(fmt)


class ChatTemplate:
    """A checkpoint's Jinja `chat_template`, rendered as transformers renders it: a sandboxed environment
    with trim_blocks and lstrip_blocks, `raise_exception`, and the special tokens' strings as variables."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise          # what Hugging Face templates call
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        self.source, self.bos_token, self.eos_token = source, bos_token or "", eos_token or ""
        self._template = env.from_string(source)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """`kwargs`: more template variables: `tools` (OpenAI's tool list, as transformers passes it), a
        request's chat_template_kwargs (e.g. `thinking`)."""
        return self._template.render(**{**kwargs, "messages": messages, "add_generation_prompt": add_generation_prompt,
                                        "bos_token": self.bos_token, "eos_token": self.eos_token})

    @classmethod
    def of_dir(cls, path) -> "ChatTemplate | None":
        """The template in a model directory's tokenizer_config.json, or None."""
        file = os.path.join(path, "tokenizer_config.json")
        if not os.path.exists(file):
            return None
        try:
            with open(file) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{file}: not readable JSON ({e})") from None
        source = _default_template(config.get("chat_template"))
        return None if not source else cls(source, _token_text(config.get("bos_token")),
                                           _token_text(config.get("eos_token")))


def _default_template(t):
    if isinstance(t, list):      # named templates: take the default one
        named = {x.get("name"): x.get("template") for x in t}
        return named.get("default") or next(iter(named.values()), None)
    return t


class Tokenizer:
    def __init__(self, tok, config: dict | None = None):
        self.tok = tok
        config = config or {}
        self.chat_template = _default_template(config.get("chat_template"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.eos_token_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_token_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.add_bos = bool(config.get("add_bos_token")) and self.bos_token_id is not None
        self._template = None

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"{path}: no tokenizer.json (the model directory needs one to take text)")
        config = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg_file):
            try:
                with open(cfg_file) as f:
                    config = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"{cfg_file}: not readable JSON ({e})") from None
        try:
            tok = HFTokenizer.from_file(file)
        except Exception as e:        # the Rust side raises plain Exceptions
            raise ValueError(f"{file}: not a readable tokenizer.json ({e})") from None
        return cls(tok, config)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; with add_special_tokens, BOS first when tokenizer_config.json says add_bos_token.
        Through `encode_batch`, which releases the GIL (`encode` holds it: 1.5 s for 2 MB of text, during
        which a server's event loop could not answer anyone)."""
        ids = self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's text as clients see it (for logprobs); special tokens keep their name."""
        return self.tok.decode([token_id], skip_special_tokens=False)

    def set_chat_template(self, source: str):
        """Use `source` (a Jinja chat template) in place of the model's (`fewchips serve --chat-template`)."""
        self.chat_template, self._template = source, ChatTemplate(source, self.bos_token, self.eos_token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of the conversation followed by the assistant's turn opening; `kwargs` reach the template."""
        if self.chat_template:
            if self._template is None:
                self._template = ChatTemplate(self.chat_template, self.bos_token, self.eos_token)
            text = self._template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
            return self.encode(text, add_special_tokens=False)
        # No template: a plain transcript.
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
        return self.encode(text + "Assistant:" if add_generation_prompt else text)


class TextStream:
    """Turns a growing list of token ids into text deltas. Holds back an incomplete UTF-8 character
    and any tail that could be the start of a stop string; cuts the text at the first stop string."""

    def __init__(self, tokenizer, stops: list[str], skip_special_tokens: bool = True, include_stop: bool = False):
        self.tok, self.stops = tokenizer, [s for s in stops if s]
        self.skip_special, self.include_stop = skip_special_tokens, include_stop
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def _text(self):
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip_special)
        cuts = [(text.find(s), s) for s in self.stops if s in text]
        if cuts:
            self.stopped = True
            at, stop = min(cuts)
            return text[: at + (len(stop) if self.include_stop else 0)], True
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
