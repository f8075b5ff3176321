# ruff: noqa: RUF001  (DeepSeek's special tokens really use the fullwidth vertical bar U+FF5C)
"""Write a GGUF with random weights and exactly the shapes of DeepSeek-R1-Distill-Qwen-1.5B, as Q4_K_M.

No weights can be downloaded here; a model with the real shapes and quantisation runs at the real
model's speed (the work per token does not depend on the values), which is what benchmarks need.
qwen2, 28 layers, hidden 1536, 12 heads, 2 KV heads, FFN 8960, vocab 151936, untied output.

    python scripts/r1_shaped.py OUT.gguf
"""

from __future__ import annotations

import ctypes
import sys
import tempfile
from pathlib import Path

import numpy as np

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 1536, 28, 12, 2, 8960, 151936
HEAD_DIM = HIDDEN // HEADS
SPECIAL = {
    151643: "<｜end▁of▁sentence｜>",
    151644: "<｜User｜>",
    151645: "<｜Assistant｜>",
    151646: "<｜begin▁of▁sentence｜>",
    151648: "<think>",
    151649: "</think>",
}
# The shape of the R1-distill template: no system prompt injected, the answer opens inside <think>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)


def byte_units() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 base tokens of a byte-level BPE vocabulary."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def vocabulary(words: list[str]) -> tuple[list[str], list[int], list[str]]:
    """Byte tokens, whole-word tokens (with their merge chains) for ``words``, fillers, specials."""
    units = byte_units()
    tokens, merges, seen = list(units), [], set(units)
    for word in words:
        encoded = "".join(units[b] for b in (" " + word).encode())
        for end in range(2, len(encoded) + 1):
            piece = encoded[:end]
            if piece not in seen:
                merges.append(f"{encoded[: end - 1]} {encoded[end - 1]}")
                tokens.append(piece)
                seen.add(piece)
    fill = 0
    while len(tokens) < min(SPECIAL):
        tokens.append(f"<filler_{fill}>")
        fill += 1
    types = [1] * len(tokens)
    for token_id in range(min(SPECIAL), VOCAB):
        tokens.append(SPECIAL.get(token_id, f"<|reserved_{token_id}|>"))
        types.append(3 if token_id in (151643, 151646) else 4)
    return tokens, types, merges


def write_f16(path: Path, words: list[str]) -> None:
    import gguf

    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("DeepSeek-R1-Distill-Qwen-1.5B shape, random weights")
    w.add_context_length(131072)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, types, merges = vocabulary(words)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(151646)
    w.add_eos_token_id(151643)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)
    ones = np.ones(HIDDEN, dtype=np.float32)
    w.add_tensor("token_embd.weight", weight(VOCAB, HIDDEN))
    for i in range(LAYERS):
        p = f"blk.{i}"
        w.add_tensor(f"{p}.attn_norm.weight", ones)
        w.add_tensor(f"{p}.attn_q.weight", weight(HIDDEN, HIDDEN))
        w.add_tensor(f"{p}.attn_q.bias", np.zeros(HIDDEN, dtype=np.float32))
        w.add_tensor(f"{p}.attn_k.weight", weight(KV_HEADS * HEAD_DIM, HIDDEN))
        w.add_tensor(f"{p}.attn_k.bias", np.zeros(KV_HEADS * HEAD_DIM, dtype=np.float32))
        w.add_tensor(f"{p}.attn_v.weight", weight(KV_HEADS * HEAD_DIM, HIDDEN))
        w.add_tensor(f"{p}.attn_v.bias", np.zeros(KV_HEADS * HEAD_DIM, dtype=np.float32))
        w.add_tensor(f"{p}.attn_output.weight", weight(HIDDEN, HIDDEN))
        w.add_tensor(f"{p}.ffn_norm.weight", ones)
        w.add_tensor(f"{p}.ffn_gate.weight", weight(FFN, HIDDEN))
        w.add_tensor(f"{p}.ffn_up.weight", weight(FFN, HIDDEN))
        w.add_tensor(f"{p}.ffn_down.weight", weight(HIDDEN, FFN))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", weight(VOCAB, HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src: Path, dst: Path) -> None:
    """llama.cpp's own quantiser, through llama-cpp-python's binding."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if code != 0:
        raise SystemExit(f"llama_model_quantize failed with {code}")


def build(out: Path, words: list[str]) -> Path:
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        f16 = Path(tmp) / "f16.gguf"
        write_f16(f16, words)
        partial = Path(tmp) / out.name
        quantize(f16, partial)
        partial.rename(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(build(Path(sys.argv[1]), []))
