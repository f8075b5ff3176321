"""ctypes layouts of Rockchip's RKLLM runtime C API (``rkllm.h``), one per ABI the runtime has had.

A struct that does not match the ``librkllmrt.so`` in use crashes the process, so the layout is
chosen by the runtime version the profile or config pins, never guessed. Read from each release of
airockchip/rknn-llm's ``rkllm-runtime/.../include/rkllm.h``:

- ``1.1``   (v1.1.0 - v1.1.4): ``RKLLMExtendParam`` is ``base_domain_id`` + 112 reserved bytes; the
  result callback returns ``void``; no logits, no perf.
- ``1.2.0`` (v1.2.0): extend param gains ``embed_flash``, ``enabled_cpus_num``, ``enabled_cpus_mask``;
  ``RKLLMParam`` gains ``n_keep``; ``RKLLMInferParam`` gains ``keep_history``; results carry logits.
- ``1.2.1`` (v1.2.1 - v1.2.3): extend param gains ``n_batch`` and ``use_cross_attn``; ``RKLLMInput``
  gains ``role`` and ``enable_thinking``; the multimodal input grows; results carry ``perf``
  (prefill/generate time and tokens, memory); the callback returns ``int``.
- ``1.3.0`` (v1.3.0): ``RKLLMParam`` gains ``ignore_eos_token`` and loses the ``img_*`` fields;
  ``RKLLMInferParam`` gains ``sampling_params`` and ``max_new_tokens``; ``rkllm_init`` takes an
  ``RKLLMCallback`` struct (result, tokenizer and embedding callbacks) instead of a function.

Function tools (``rkllm_set_function_tools(handle, system_prompt, tools, tool_response_str)``, the tools
as a JSON string; ``RKLLMInput.role`` ``"user"`` or ``"tool"``), per release's ``rkllm.h``:

=============  ==============================  ===================  ===========================
release        rkllm_set_function_tools        RKLLMInput.role,     rkllm_set_chat_template
                                               .enable_thinking
=============  ==============================  ===================  ===========================
1.1.0-1.1.4    no                              no                   no
1.2.0          no                              no                   yes
1.2.1b1        no                              no                   yes
1.2.1-1.2.3    yes                             yes                  yes
1.3.0          yes                             yes                  yes
=============  ==============================  ===================  ===========================

The runtime renders the tools itself, into the system prompt of the chat template it parsed from the
Hugging Face model at conversion (Qwen's ``# Tools ... <tools></tools>``), and the model answers in its
own markup, which the caller parses (the official server demo parses Qwen's ``<tool_call>{...}
</tool_call>``). That rendering exists only while the runtime's own template is on:
``rkllm_set_chat_template`` switches it off ("W rkllm: Calling rkllm_set_chat_template will disable the
internal automatic chat template parsing, including enable_thinking"), after which the tools no longer
reach the prompt (airockchip/rknn-llm issues 429, 431), and with no template the call fails ("Failed to
set function tools, possibly because the chat_template is empty", issue 397). edged renders every
prompt itself with the GGUF's template (so it counts the tokens and renders a job's whole history,
earlier calls and results included, the same on the CPU and the NPU) and switches the runtime's
template off, so it does not call ``rkllm_set_function_tools``: the tools go into the prompt as on the
CPU, and the calls are parsed from the text (``Abi.function_tools`` only reports the API).

The test ``tests/test_rkllm_abi.py`` compiles the same layouts in C with gcc and compares every
``sizeof`` and ``offsetof`` with these classes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import re
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    Union,
    c_bool,
    c_char_p,
    c_float,
    c_int,
    c_int8,
    c_int32,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)
from dataclasses import dataclass
from typing import Any

# LLMCallState
RUN_NORMAL, RUN_WAITING, RUN_FINISH, RUN_ERROR = 0, 1, 2, 3
# RKLLMInputType / RKLLMInferMode
INPUT_PROMPT = 0
INFER_GENERATE = 0


class EmbedInput(Structure):
    _fields_ = [("embed", POINTER(c_float)), ("n_tokens", c_size_t)]


class TokenInput(Structure):
    _fields_ = [("input_ids", POINTER(c_int32)), ("n_tokens", c_size_t)]


class LoraParam(Structure):
    _fields_ = [("lora_adapter_name", c_char_p)]


class PromptCacheParam(Structure):
    _fields_ = [("save_prompt_cache", c_int), ("prompt_cache_path", c_char_p)]


class LastHiddenLayer(Structure):
    _fields_ = [("hidden_states", POINTER(c_float)), ("embd_size", c_int), ("num_tokens", c_int)]


class Logits(Structure):
    _fields_ = [("logits", POINTER(c_float)), ("vocab_size", c_int), ("num_tokens", c_int)]


class PerfStat(Structure):
    _fields_ = [
        ("prefill_time_ms", c_float),
        ("prefill_tokens", c_int),
        ("generate_time_ms", c_float),
        ("generate_tokens", c_int),
        ("memory_usage_mb", c_float),
    ]


_SAMPLING: list[Any] = [
    ("top_k", c_int32),
    ("top_p", c_float),
    ("temperature", c_float),
    ("repeat_penalty", c_float),
    ("frequency_penalty", c_float),
    ("presence_penalty", c_float),
    ("mirostat", c_int32),
    ("mirostat_tau", c_float),
    ("mirostat_eta", c_float),
]
_IMAGES: list[Any] = [("img_start", c_char_p), ("img_end", c_char_p), ("img_content", c_char_p)]


# -- 1.1 ------------------------------------------------------------------------------------------


class ExtendParam11(Structure):
    _fields_ = [("base_domain_id", c_int32), ("reserved", c_uint8 * 112)]


class Param11(Structure):
    _fields_ = [
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        *[f for f in _SAMPLING],
        ("skip_special_token", c_bool),
        ("is_async", c_bool),
        *_IMAGES,
        ("extend_param", ExtendParam11),
    ]


class MultiModalInput11(Structure):
    _fields_ = [("prompt", c_char_p), ("image_embed", POINTER(c_float)), ("n_image_tokens", c_size_t)]


class InputUnion11(Union):
    _fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", EmbedInput),
        ("token_input", TokenInput),
        ("multimodal_input", MultiModalInput11),
    ]


class Input11(Structure):
    _anonymous_ = ("u",)
    _fields_ = [("input_type", c_int), ("u", InputUnion11)]


class InferParam11(Structure):
    _fields_ = [
        ("mode", c_int),
        ("lora_params", POINTER(LoraParam)),
        ("prompt_cache_params", POINTER(PromptCacheParam)),
    ]


class Result11(Structure):
    _fields_ = [("text", c_char_p), ("token_id", c_int32), ("last_hidden_layer", LastHiddenLayer)]


# -- 1.2.0 ----------------------------------------------------------------------------------------


class ExtendParam120(Structure):
    _fields_ = [
        ("base_domain_id", c_int32),
        ("embed_flash", c_int8),
        ("enabled_cpus_num", c_int8),
        ("enabled_cpus_mask", c_uint32),
        ("reserved", c_uint8 * 106),
    ]


def _param_12(extend: type[Structure]) -> list[Any]:
    return [
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        ("top_k", c_int32),
        ("n_keep", c_int32),
        *_SAMPLING[1:],
        ("skip_special_token", c_bool),
        ("is_async", c_bool),
        *_IMAGES,
        ("extend_param", extend),
    ]


class Param120(Structure):
    _fields_ = _param_12(ExtendParam120)


class InferParam120(Structure):
    _fields_ = [*InferParam11._fields_, ("keep_history", c_int)]


class Result120(Structure):
    _fields_ = [*Result11._fields_, ("logits", Logits)]


# -- 1.2.1 - 1.2.3 --------------------------------------------------------------------------------


class ExtendParam121(Structure):
    _fields_ = [
        ("base_domain_id", c_int32),
        ("embed_flash", c_int8),
        ("enabled_cpus_num", c_int8),
        ("enabled_cpus_mask", c_uint32),
        ("n_batch", c_uint8),
        ("use_cross_attn", c_int8),
        ("reserved", c_uint8 * 104),
    ]


class Param121(Structure):
    _fields_ = _param_12(ExtendParam121)


class MultiModalInput121(Structure):
    _fields_ = [
        ("prompt", c_char_p),
        ("image_embed", POINTER(c_float)),
        ("n_image_tokens", c_size_t),
        ("n_image", c_size_t),
        ("image_width", c_size_t),
        ("image_height", c_size_t),
    ]


class InputUnion121(Union):
    _fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", EmbedInput),
        ("token_input", TokenInput),
        ("multimodal_input", MultiModalInput121),
    ]


class Input121(Structure):
    _anonymous_ = ("u",)
    _fields_ = [("role", c_char_p), ("enable_thinking", c_bool), ("input_type", c_int), ("u", InputUnion121)]


class Result121(Structure):
    _fields_ = [*Result120._fields_, ("perf", PerfStat)]


# -- 1.2.1b1: 1.2.0's layout with 1.2.1's larger multimodal input (no role, void callback) ---------


class Input121b1(Structure):
    _anonymous_ = ("u",)
    _fields_ = [("input_type", c_int), ("u", InputUnion121)]


# -- 1.3.0 ----------------------------------------------------------------------------------------


class Param130(Structure):
    _fields_ = [
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        ("top_k", c_int32),
        ("n_keep", c_int32),
        *_SAMPLING[1:],
        ("skip_special_token", c_bool),
        ("ignore_eos_token", c_bool),
        ("is_async", c_bool),
        ("extend_param", ExtendParam121),
    ]


class ImageInput130(Structure):
    _fields_ = [
        ("image_embed", POINTER(c_float)),
        ("n_image_tokens", c_size_t),
        ("n_image", c_size_t),
        ("image_start", c_char_p),
        ("image_end", c_char_p),
        ("image_content", c_char_p),
        ("image_width", c_size_t),
        ("image_height", c_size_t),
    ]


class VideoInput130(Structure):
    _fields_ = [
        ("video_embed", POINTER(c_float)),
        ("n_frame_tokens", c_size_t),
        ("n_frame_per_video", c_size_t),
        ("n_video", c_size_t),
        ("video_start", c_char_p),
        ("video_end", c_char_p),
        ("video_content", c_char_p),
        ("frame_width", c_size_t),
        ("frame_height", c_size_t),
    ]


class MultiModalInput130(Structure):
    _fields_ = [("prompt", c_char_p), ("image", ImageInput130), ("video", VideoInput130)]


class InputUnion130(Union):
    _fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", EmbedInput),
        ("token_input", TokenInput),
        ("multimodal_input", MultiModalInput130),
    ]


class Input130(Structure):
    _anonymous_ = ("u",)
    _fields_ = [("role", c_char_p), ("enable_thinking", c_bool), ("input_type", c_int), ("u", InputUnion130)]


class SamplingParam130(Structure):
    _fields_ = _SAMPLING


class InferParam130(Structure):
    _fields_ = [
        *InferParam11._fields_,
        ("sampling_params", POINTER(SamplingParam130)),
        ("keep_history", c_int),
        ("max_new_tokens", c_int32),
    ]


VoidResultCallback = CFUNCTYPE(None, c_void_p, c_void_p, c_int)
IntResultCallback = CFUNCTYPE(c_int, c_void_p, c_void_p, c_int)
TokenizerCallback = CFUNCTYPE(c_int, c_void_p, c_char_p, c_int32, POINTER(c_int32), c_int32)
EmbedCallback = CFUNCTYPE(c_int, c_void_p, POINTER(c_int32), c_uint64, c_void_p, c_uint64)


class Callback130(Structure):
    _fields_ = [
        ("result_callback", IntResultCallback),
        ("result_userdata", c_void_p),
        ("tokenizer_callback", TokenizerCallback),
        ("tokenizer_userdata", c_void_p),
        ("embed_callback", EmbedCallback),
        ("embed_userdata", c_void_p),
    ]


@dataclass(frozen=True)
class Abi:
    """Everything that differs between runtime releases."""

    name: str
    releases: str
    param: type[Structure]
    extend: type[Structure]
    input: type[Structure]
    infer: type[Structure]
    result: type[Structure]
    callback: type[ctypes._CFuncPtr]  # type: ignore[name-defined]
    callback_returns_int: bool
    init_takes_callback_struct: bool
    has_perf: bool
    function_tools: bool = False
    """The release has ``rkllm_set_function_tools`` (edged does not call it, see above)."""


_ABI_120 = Abi(
    "1.2.0",
    "1.2.0",
    Param120,
    ExtendParam120,
    Input11,
    InferParam120,
    Result120,
    VoidResultCallback,
    False,
    False,
    False,
)

ABIS: dict[str, Abi] = {
    abi.name: abi
    for abi in (
        Abi(
            "1.1",
            "1.1.0-1.1.4",
            Param11,
            ExtendParam11,
            Input11,
            InferParam11,
            Result11,
            VoidResultCallback,
            False,
            False,
            False,
        ),
        _ABI_120,
        # 1.2.1b1 is 1.2.0 in every struct but the input, whose multimodal member is 1.2.1's larger one.
        dataclasses.replace(_ABI_120, name="1.2.1b1", releases="1.2.1b1", input=Input121b1),
        Abi(
            "1.2.1",
            "1.2.1-1.2.3",
            Param121,
            ExtendParam121,
            Input121,
            InferParam120,
            Result121,
            IntResultCallback,
            True,
            False,
            True,
            function_tools=True,
        ),
        Abi(
            "1.3.0",
            "1.3.0",
            Param130,
            ExtendParam121,
            Input130,
            InferParam130,
            Result121,
            IntResultCallback,
            True,
            True,
            True,
            function_tools=True,
        ),
    )
}


def abi_for(version: str) -> Abi:
    """The layout for a runtime version such as ``1.2.3`` or ``1.2.1b1``; an unknown one is refused
    (a pre-release has its own ABI: only the ones known here are accepted)."""
    version = version.strip().lstrip("v")
    if version == "1.2.1b1":
        return ABIS["1.2.1b1"]
    if not re.fullmatch(r"\d+(\.\d+){1,2}", version):
        known = ", ".join(a.releases for a in ABIS.values())
        raise ValueError(f"unsupported RKLLM runtime version {version!r}: edged knows the layouts of {known}")
    parts = version.split(".")
    if len(parts) >= 2 and parts[0] == "1" and parts[1] == "1":
        return ABIS["1.1"]
    if len(parts) >= 2 and parts[:2] == ["1", "2"]:
        patch = parts[2] if len(parts) > 2 else "0"
        if patch == "0":
            return ABIS["1.2.0"]
        if patch in ("1", "2", "3"):
            return ABIS["1.2.1"]
    if parts[:3] == ["1", "3", "0"] or parts == ["1", "3"]:
        return ABIS["1.3.0"]
    known = ", ".join(f"{a.releases}" for a in ABIS.values())
    raise ValueError(f"unsupported RKLLM runtime version {version!r}: edged knows the layouts of {known}")
