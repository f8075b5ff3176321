"""A GGUF with random weights and exactly the shapes of DeepSeek-R1-Distill-Qwen-1.5B, quantized to Q4_K_M.

Decode speed on a CPU depends on the bytes of weights read per token and prefill speed on the matrix
shapes, not on the values: a model of the same architecture, shapes and quantization runs at the real
model's speed. This one is qwen2, 28 layers, hidden 1536, 12 heads, 2 KV heads, FFN 8960, vocab
151936, untied output; the F16 file is written tensor by tensor (nothing larger than one tensor is held
in memory), then llama.cpp's own quantizer makes the Q4_K_M file (about 1.1 GB). The tokenizer is a
real byte-level BPE (`edged.bench.vocab`), so prompts cost about as many tokens as on the real model.
"""

from __future__ import annotations

import ctypes
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edged.bench.jobs import BenchError
from edged.bench.vocab import BOS_ID, CHAT_TEMPLATE, EOS_ID, build_vocabulary

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 1536, 28, 12, 2, 8960
HEAD_DIM = HIDDEN // HEADS
KV_DIM = KV_HEADS * HEAD_DIM
CONTEXT_LENGTH = 131072
ROPE_THETA = 10000.0
RMS_EPS = 1e-6
MISSING_GGUF = "the synthetic model needs the gguf package: pip install 'edged[bench]'"

# (phase, done, total): phase is "write" (tensors of the F16 file) or "quantize" (llama.cpp's tensors).
ProgressFn = Callable[[str, int, int], None]


class SynthError(BenchError):
    """The model could not be written (missing package, existing file, quantizer failure)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order: rows, columns
    kind: str  # "weight" (random), "ones" (norms) or "zeros" (biases)


def tensor_specs(layers: int, vocab_size: int) -> list[TensorSpec]:
    """The tensors of a qwen2 model with R1-Distill-Qwen-1.5B's shapes, in file order."""
    specs = [TensorSpec("token_embd.weight", (vocab_size, HIDDEN), "weight")]
    for i in range(layers):
        p = f"blk.{i}"
        specs += [
            TensorSpec(f"{p}.attn_norm.weight", (HIDDEN,), "ones"),
            TensorSpec(f"{p}.attn_q.weight", (HIDDEN, HIDDEN), "weight"),
            TensorSpec(f"{p}.attn_q.bias", (HIDDEN,), "zeros"),
            TensorSpec(f"{p}.attn_k.weight", (KV_DIM, HIDDEN), "weight"),
            TensorSpec(f"{p}.attn_k.bias", (KV_DIM,), "zeros"),
            TensorSpec(f"{p}.attn_v.weight", (KV_DIM, HIDDEN), "weight"),
            TensorSpec(f"{p}.attn_v.bias", (KV_DIM,), "zeros"),
            TensorSpec(f"{p}.attn_output.weight", (HIDDEN, HIDDEN), "weight"),
            TensorSpec(f"{p}.ffn_norm.weight", (HIDDEN,), "ones"),
            TensorSpec(f"{p}.ffn_gate.weight", (FFN, HIDDEN), "weight"),
            TensorSpec(f"{p}.ffn_up.weight", (FFN, HIDDEN), "weight"),
            TensorSpec(f"{p}.ffn_down.weight", (HIDDEN, FFN), "weight"),
        ]
    specs += [
        TensorSpec("output_norm.weight", (HIDDEN,), "ones"),
        TensorSpec("output.weight", (vocab_size, HIDDEN), "weight"),
    ]
    return specs


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise SynthError(MISSING_GGUF) from exc
    return gguf


def random_f16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random F16 weights of either sign and magnitude 2^-8 .. 2^-4 (standard deviation about 0.027).

    Made from random bits (sign and mantissa kept, exponent limited to 7..10): four times faster than
    drawing normal floats and converting them, which is most of the time a small variant takes.
    """
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    exponent = (bits >> 10) & 0x3
    exponent += 7
    exponent <<= 10
    bits &= 0x83FF
    bits |= exponent
    return bits.view(np.float16)


def write_f16(path: Path, *, layers: int = LAYERS, seed: int = 0, progress: ProgressFn | None = None) -> None:
    """The unquantized model: metadata, tokenizer, then each tensor as it is generated."""
    gguf = _gguf()
    vocab = build_vocabulary()
    specs = tensor_specs(layers, len(vocab.tokens))
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name(f"DeepSeek-R1-Distill-Qwen-1.5B shape ({layers} layers), random weights")
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(layers)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-r1-qwen")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_pad_token_id(EOS_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for spec in specs:
        dtype = np.float16 if spec.kind == "weight" else np.float32
        nbytes = int(np.prod(spec.shape)) * np.dtype(dtype).itemsize
        w.add_tensor_info(spec.name, spec.shape, np.dtype(dtype), nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for done, spec in enumerate(specs, 1):
        if spec.kind == "weight":
            data = random_f16(rng, spec.shape)
        else:
            data = np.full(spec.shape, 1.0 if spec.kind == "ones" else 0.0, dtype=np.float32)
        w.write_tensor_data(data)
        del data
        if progress:
            progress("write", done, len(specs))
    w.close()


_QUANT_LINE = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]")


def quantize(src: Path, dst: Path, *, progress: ProgressFn | None = None) -> None:
    """llama.cpp's own Q4_K_M quantizer through llama-cpp-python; progress from its per-tensor log lines."""
    import llama_cpp
    import llama_cpp._logger as llama_logger

    @llama_cpp.llama_log_callback
    def on_log(_level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        match = _QUANT_LINE.search(text or b"")
        if match and progress:
            progress("quantize", int(match.group(1)), int(match.group(2)))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    try:
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        # llama-cpp-python's own callback (prints only when verbose), as at its import.
        llama_cpp.llama_log_set(llama_logger.llama_log_callback, ctypes.c_void_p(0))
    if code != 0:
        raise SynthError(f"llama_model_quantize failed with code {code}")


def build(
    out: Path, *, layers: int = LAYERS, force: bool = False, progress: ProgressFn | None = None
) -> Path:
    """Write the Q4_K_M model to ``out`` (through a temporary F16 file next to it, renamed when complete)."""
    if layers < 1:
        raise SynthError(f"--layers must be at least 1, not {layers}")
    if out.exists() and not force:
        raise SynthError(f"{out} exists (use --force to overwrite it)")
    _gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".synth-", dir=out.parent) as tmp:
        f16 = Path(tmp) / "f16.gguf"
        write_f16(f16, layers=layers, progress=progress)
        partial = Path(tmp) / out.name
        quantize(f16, partial, progress=progress)
        partial.replace(out)
    return out
