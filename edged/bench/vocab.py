"""The tokenizer of the synthetic R1-shaped model: byte-level BPE, R1's special tokens, R1's chat template.

DeepSeek-R1-Distill-Qwen-1.5B uses Qwen2's byte-level BPE (151,643 regular tokens, then the special
ones, padded to 151,936). A benchmark needs prompts to cost as many tokens as on the real model, so
English text must tokenize into roughly word-sized pieces: the vocabulary here is GPT-2's 256 byte
units plus, for each word of ``words.txt`` (most frequent first), the merges that build it.

How the merges are made: for each text to become one token (each word led by a space, then its
capitalised and bare forms, most frequent words first), the text is tokenized with the merges made so
far, exactly as llama.cpp would (the adjacent pair of lowest rank first), and merges joining the
resulting pieces left to right are appended. Those new merges rank after every earlier one, so they
never change how an earlier text tokenizes: every listed word is one token, and an unlisted word falls
into the pieces of listed ones, as with a trained BPE.
"""

# ruff: noqa: RUF001 - R1's markers are spelled with fullwidth bars and a lower block, as in its tokenizer.

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

VOCAB_SIZE = 151936
FIRST_SPECIAL = 151643
BOS_ID = 151646
EOS_ID = 151643

# The added tokens of DeepSeek-R1-Distill-Qwen's tokenizer; ids above them are padding.
SPECIAL_TOKENS: dict[int, str] = {
    151643: "<｜end▁of▁sentence｜>",
    151644: "<｜User｜>",
    151645: "<｜Assistant｜>",
    151646: "<｜begin▁of▁sentence｜>",
    151647: "<|EOT|>",
    151648: "<think>",
    151649: "</think>",
    151650: "<|quad_start|>",
    151651: "<|quad_end|>",
    151652: "<|vision_start|>",
    151653: "<|vision_end|>",
    151654: "<|vision_pad|>",
    151655: "<|image_pad|>",
    151656: "<|video_pad|>",
    151657: "<tool_call>",
    151658: "</tool_call>",
    151659: "<|fim_prefix|>",
    151660: "<|fim_middle|>",
    151661: "<|fim_suffix|>",
    151662: "<|fim_pad|>",
    151663: "<|repo_name|>",
    151664: "<|file_sep|>",
}
# In the published tokenizer only BOS/EOS and Qwen's own markers are "special" (control tokens); the
# R1 chat markers and <think> are plain added tokens (llama.cpp: user-defined).
USER_DEFINED = {151644, 151645, 151647, 151648, 151649, 151657, 151658}

# Qwen2's pre-tokenizer splits these off words and groups punctuation runs: frequent ones get a token.
EXTRA_PIECES = (
    *("'s", "'t", "'re", "'ve", "'m", "'ll", "'d"),
    *(".\n", ".\n\n", "\n\n", ":\n", ",\n", " (", ").", "),", ' "', '",', '".', "...", " -", "--"),
)

# gguf.TokenType values (kept here so that building the vocabulary needs no gguf import).
NORMAL, CONTROL, USER_DEFINED_TYPE, UNUSED = 1, 3, 4, 5

# DeepSeek-R1-Distill's chat template: no system prompt injected, the answer opens inside <think>.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}"
    "{{ '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}"
    "{%- set ns.is_output_first = false %}"
    "{%- else %}{{ '\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}"
    "{%- endif %}{%- endif %}"
    "{%- endfor -%}"
    "{% if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' }}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Vocabulary:
    """What a GGUF's ``tokenizer.ggml.*`` keys hold: token texts, their types, the ranked merges."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    n_pieces: int  # regular tokens made by merges (the rest up to 151,643 are fillers)


def byte_units() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 base tokens of a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    units, extra = [], 0
    for byte in range(256):
        if byte in printable:
            units.append(chr(byte))
        else:
            units.append(chr(256 + extra))
            extra += 1
    return units


def load_words() -> list[str]:
    """The shipped word list (most frequent first)."""
    text = resources.files("edged.bench").joinpath("words.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def _bpe(units: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-level BPE as llama.cpp applies it: merge the adjacent pair of lowest rank until none is left."""
    parts = list(units)
    while len(parts) > 1:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            rank = ranks.get((parts[i], parts[i + 1]))
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _texts(words: list[str]) -> list[str]:
    """What to make single tokens of, most useful first: every word led by a space (most words of
    running text), then the capitalised and bare forms (sentence starts, after newlines or brackets)."""
    texts = list(EXTRA_PIECES)
    texts += [" " + w for w in words]
    for w in words:
        texts += [" " + w.capitalize(), w.capitalize(), w]
    return texts


def build_vocabulary(words: list[str] | None = None) -> Vocabulary:
    """Byte units, merges that make each of ``words`` one token (see the module docstring), fillers up
    to the regular-token count, then R1's special tokens and padding."""
    words = load_words() if words is None else words
    units = byte_units()
    tokens = list(units)
    seen = set(units)
    ranks: dict[tuple[str, str], int] = {}
    for text in _texts(words):
        parts = _bpe([units[b] for b in text.encode("utf-8")], ranks)
        if len(tokens) + len(parts) - 1 > FIRST_SPECIAL:
            break
        piece = parts[0]
        for part in parts[1:]:
            ranks[(piece, part)] = len(ranks)
            piece += part
            if piece not in seen:
                tokens.append(piece)
                seen.add(piece)
    merges = [f"{left} {right}" for (left, right), _ in sorted(ranks.items(), key=lambda item: item[1])]
    n_pieces = len(tokens) - len(units)
    types = [NORMAL] * len(tokens)
    filler = 0
    while len(tokens) < FIRST_SPECIAL:
        tokens.append(f"<filler_{filler}>")
        types.append(NORMAL)
        filler += 1
    for token_id in range(FIRST_SPECIAL, VOCAB_SIZE):
        if token_id in SPECIAL_TOKENS:
            tokens.append(SPECIAL_TOKENS[token_id])
            types.append(USER_DEFINED_TYPE if token_id in USER_DEFINED else CONTROL)
        else:
            tokens.append(f"[PAD{token_id}]")
            types.append(UNUSED)
    return Vocabulary(tokens=tokens, types=types, merges=merges, n_pieces=n_pieces)
