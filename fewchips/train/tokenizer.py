"""Byte-level BPE tokenizer, trained with the `tokenizers` library on the training corpus.

Special tokens use DeepSeek-V3's literal strings (full-width bars and `▁`, as in the released tokenizer.json) and
take the first ids, so they agree with the presets' `bos_token_id=0`, `eos_token_id=1`. An existing
`tokenizer.json` (DeepSeek-V3's own, say) is accepted as long as it has these tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..files import atomic_write_text

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_END = "<｜fim▁end｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
# DeepSeek-V3's tool-call tokens and R1's reasoning markers (tokenizer.json of the releases)
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
THINK, THINK_END = "<think>", "</think>"
TOOL_TOKENS = [TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP, TOOL_OUTPUTS_BEGIN,
               TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END]
# ids 0..6 the core ones, then the tool and reasoning tokens, in a tokenizer we train
SPECIAL_TOKENS = [BOS, EOS, FIM_HOLE, FIM_BEGIN, FIM_END, USER, ASSISTANT, *TOOL_TOKENS, THINK, THINK_END]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)          # a byte-level BPE holds every byte and the special tokens


def check_vocab_size(n: int, flag: str = "--vocab-size"):
    """A size a byte-level BPE can be trained to, said before any text is read."""
    if n < MIN_VOCAB:
        raise ValueError(f"{flag} {n} is below the smallest byte-level BPE: {MIN_VOCAB} (256 bytes + "
                         f"{len(SPECIAL_TOKENS)} special tokens)")

# BOS and the system prompts joined by blank lines (both templates below; their `ns` holds system_prompt, is_first_sp)
_SYSTEM_PROMPT = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}"
    "{% else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{% endif %}"
    "{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
)

# DeepSeek-V3's chat format, as its released tokenizer_config.json renders it without tools:
#   BOS, the system prompts joined by blank lines, then <｜User｜>{user} and <｜Assistant｜>{assistant}EOS
#   turns with nothing in between, and <｜Assistant｜> to open the reply.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='', is_first_sp=true) %}"
    + _SYSTEM_PROMPT +
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '" + USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '" + ASSISTANT + "' + message['content'] + '" + EOS + "' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}")

# The same, with tools as DeepSeek-V3 renders them (its released template, the single-call case closed with
# tool_calls_end as in its multi-call case): an assistant turn's tool calls after its content,
#   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>
#   (\n and the next call) <｜tool▁calls▁end｜>EOS
# tool results as <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>(\n...)
#   <｜tool▁outputs▁end｜>
# after which the reply follows without <｜Assistant｜>; the `tools` given, as JSON after the system prompt
# (vLLM's DeepSeek-V3 tool template's wording). A chat without tools renders as CHAT_TEMPLATE does.
TOOL_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='', is_first_sp=true, is_tool=false, is_output_first=true) %}"
    + _SYSTEM_PROMPT +
    "{% if tools %}{{ '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return " + TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN + "function"
    + TOOL_SEP + "<function_name>\n```json\n<function_arguments_in_json_format>\n```" + TOOL_CALL_END
    + ", the calls separated by a new line, then " + TOOL_CALLS_END + EOS + "' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% set ns.is_tool = false %}{{ '" + USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if ns.is_tool %}{{ '" + TOOL_OUTPUTS_END + "' }}{% set ns.is_tool = false %}"
    "{% else %}{{ '" + ASSISTANT + "' }}{% endif %}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message['tool_calls'] %}{{ '" + TOOL_CALLS_BEGIN + "' }}"
    "{% for call in message['tool_calls'] %}{% set args = call['function']['arguments'] %}"
    "{% if args is not string %}{% set args = args | tojson %}{% endif %}"
    "{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '" + TOOL_CALL_BEGIN + "' + (call['type'] or 'function') + '" + TOOL_SEP + "' + call['function']['name']"
    " + '\n```json\n' + args + '\n```" + TOOL_CALL_END + "' }}"
    "{% endfor %}{{ '" + TOOL_CALLS_END + "' }}{% endif %}"
    "{{ '" + EOS + "' }}{% set ns.is_output_first = true %}"
    "{% elif message['role'] == 'tool' %}"
    "{% if ns.is_output_first %}{{ '" + TOOL_OUTPUTS_BEGIN + "' }}{% set ns.is_output_first = false %}"
    "{% else %}{{ '\n' }}{% endif %}"
    "{{ '" + TOOL_OUTPUT_BEGIN + "' + message['content'] + '" + TOOL_OUTPUT_END + "' }}{% set ns.is_tool = true %}"
    "{% endif %}{% endfor %}"
    "{% if ns.is_tool %}{{ '" + TOOL_OUTPUTS_END + "' }}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{ '" + ASSISTANT + "' }}{% endif %}")


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    fim_begin: int
    fim_hole: int
    fim_end: int
    template: object = None      # the model directory's ChatTemplate (chats render through it), if it has one


def special_ids(tok: Tokenizer, source: str = "tokenizer") -> SpecialIds:
    ids = {name: tok.token_to_id(s) for name, s in
           (("bos", BOS), ("eos", EOS), ("fim_begin", FIM_BEGIN), ("fim_hole", FIM_HOLE), ("fim_end", FIM_END))}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"{source}: lacks the special token(s) {missing}; fewchips needs "
                         f"{SPECIAL_TOKENS} (DeepSeek-V3's spelling)")
    return SpecialIds(**ids)


def train_tokenizer(texts, vocab_size: int, n_texts: int | None = None) -> Tokenizer:
    """Byte-level BPE over `texts` (an iterable of strings); every byte is in the base alphabet, so
    any text encodes and decodes losslessly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=n_texts)
    # Training puts BOS before every document, so encoding text for the model does too (as DeepSeek-V3's
    # own tokenizer does); the data pipeline encodes with add_special_tokens=False and adds it itself.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no tokenizer.json here")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises plain Exceptions
        raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None
    special_ids(tok, path)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str, model_max_length: int = 2048):
    """tokenizer.json plus the tokenizer_config.json that lets transformers.AutoTokenizer load it."""
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "tokenizer.json"), tok.to_str())
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
           "pad_token": EOS, "add_bos_token": True, "add_eos_token": False,
           "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    if tok.token_to_id(USER) is not None and tok.token_to_id(ASSISTANT) is not None:
        tools = all(tok.token_to_id(t) is not None for t in TOOL_TOKENS)
        cfg["chat_template"] = TOOL_CHAT_TEMPLATE if tools else CHAT_TEMPLATE
    atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"),
                      json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha1(tok.to_str().encode()).hexdigest()[:16]


def token_byte_lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens), so bits per byte is exact on any
    slice of text. Byte-level BPE (ours, DeepSeek-V3's) writes one alphabet character per byte; other
    tokenizers fall back to decoding each id alone."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    lengths = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for piece, i in tok.get_vocab(with_added_tokens=True).items():
        if piece in special:
            continue
        lengths[i] = len(piece) if set(piece) <= alphabet else len(tok.decode([i]).encode())
    return lengths
