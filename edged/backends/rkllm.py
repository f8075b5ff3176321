"""The RK3588 NPU through Rockchip's RKLLM runtime (``librkllmrt.so``), driven with ctypes.

The struct layouts differ between runtime releases (see `rkllm_abi`), so the runtime version must be
pinned (``rkllm.runtime_version``) and, where the library carries its version string, agree with it.
Prompts are rendered and counted with the tokenizer and chat template of the GGUF of the same model
(``model.path``, loaded vocabulary-only), which is also the CPU fallback's model.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import queue
import re
import threading
from collections.abc import Iterator
from ctypes import byref, c_char_p, c_int, c_void_p
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
from pydantic import BaseModel, ConfigDict, Field

from edged.backends import Prompt, SamplingParams, register_backend
from edged.backends.gguf_prompt import GgufPrompt, gguf_problem
from edged.backends.rkllm_abi import (
    INFER_GENERATE,
    INPUT_PROMPT,
    RUN_ERROR,
    RUN_FINISH,
    RUN_WAITING,
    Abi,
    Callback130,
    abi_for,
)
from edged.errors import BackendError

if TYPE_CHECKING:
    from edged.board import BoardInfo
    from edged.config import Settings

log = structlog.get_logger(__name__)

RK3588_SOCS = ("rockchip,rk3588", "rockchip,rk3588s")
VERSION_IN_LIBRARY = re.compile(rb"rkllm-runtime version:? v?(\d+\.\d+\.\d+)")


class RkllmConfig(BaseModel):
    """Options of the rkllm backend (section ``[rkllm]``)."""

    model_config = ConfigDict(extra="forbid")

    library: str = Field(
        "librkllmrt.so",
        description="The RKLLM runtime: a path, or a file name in $LD_LIBRARY_PATH or /usr/lib.",
    )
    model: Path | None = Field(None, description="The .rkllm model (converted with rkllm-toolkit, W8A8).")
    runtime_version: str | None = Field(
        None, description="Version of librkllmrt.so, e.g. '1.2.1'; picks the struct layout. Required."
    )
    core_mask: str = Field(
        "0_1_2",
        pattern=r"^(auto|0|1|2|0_1|0_1_2)$",
        description="NPU cores as rknn-toolkit-lite2 names them; reported (the .rkllm fixes its cores).",
    )
    base_domain_id: int = Field(0, ge=0, description="RKLLMExtendParam.base_domain_id.")
    embed_flash: bool = Field(True, description="Read word embeddings from flash (saves memory).")


def library_version(path: Path) -> str | None:
    """The version string a runtime library carries, if any (``rkllm-runtime version: 1.2.1``)."""
    try:
        match = VERSION_IN_LIBRARY.search(path.read_bytes())
    except OSError:
        return None
    return match.group(1).decode() if match else None


def npu_device(board: BoardInfo) -> str | None:
    """``/dev/rknpu`` (older kernels) or a DRM node driven by rknpu (newer ones), under ``board.root``."""
    from edged.board import HostFS

    fs = HostFS(board.root)
    if fs.path("/dev/rknpu").exists():
        return "/dev/rknpu"
    drm = fs.path("/sys/class/drm")
    with contextlib.suppress(OSError):
        for node in sorted(drm.glob("*")):
            driver = node / "device" / "driver"
            with contextlib.suppress(OSError):
                if driver.is_symlink() and Path(driver.readlink()).name.lower() == "rknpu":
                    return f"/sys/class/drm/{node.name} (rknpu)"
    return None


def _find_library(name: str) -> Path | None:
    """A path as given, or the file name looked up in $LD_LIBRARY_PATH and the usual library dirs."""
    if "/" in name:
        return Path(name)
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    for directory in (*dirs, "/usr/lib", "/usr/local/lib", "/usr/lib/aarch64-linux-gnu"):
        candidate = Path(directory) / name
        if candidate.exists():
            return candidate
    return None


def _setup(lib: Any, abi: Abi) -> None:
    lib.rkllm_createDefaultParam.restype = abi.param
    lib.rkllm_createDefaultParam.argtypes = []
    lib.rkllm_init.restype = c_int
    third = ctypes.POINTER(Callback130) if abi.init_takes_callback_struct else abi.callback
    lib.rkllm_init.argtypes = [ctypes.POINTER(c_void_p), ctypes.POINTER(abi.param), third]
    lib.rkllm_run.restype = c_int
    lib.rkllm_run.argtypes = [c_void_p, ctypes.POINTER(abi.input), ctypes.POINTER(abi.infer), c_void_p]
    for name in ("rkllm_abort", "rkllm_destroy", "rkllm_is_running"):
        getattr(lib, name).restype = c_int
        getattr(lib, name).argtypes = [c_void_p]
    if hasattr(lib, "rkllm_set_chat_template"):
        lib.rkllm_set_chat_template.restype = c_int
        lib.rkllm_set_chat_template.argtypes = [c_void_p, c_char_p, c_char_p, c_char_p]


@register_backend("rkllm")
class RkllmBackend:
    """Generation on the RK3588 NPU; one run at a time, on the engine's backend thread."""

    name: ClassVar[str]

    def __init__(self, board: BoardInfo, settings: Settings) -> None:
        self._board = board
        self._settings = settings
        self._options: RkllmConfig = settings.rkllm
        self._lib: Any = None
        self._handle = c_void_p()
        self._abi: Abi | None = None
        self._callback: Any = None
        self._callback_struct: Any = None
        self._events: queue.Queue[tuple[int, bytes | None, dict[str, float] | None]] = queue.Queue()
        self._prompt: GgufPrompt | None = None
        self.last_perf: dict[str, float] | None = None

    @classmethod
    def available(cls, board: BoardInfo, settings: Settings) -> tuple[bool, str]:
        options: RkllmConfig = settings.rkllm
        if board.soc not in RK3588_SOCS and not set(board.compatible) & set(RK3588_SOCS):
            return False, f"not an RK3588 (soc {board.soc or 'unknown'})"
        device = npu_device(board)
        if device is None:
            return False, "no NPU device: neither /dev/rknpu nor a DRM render node driven by rknpu"
        if options.runtime_version is None:
            return False, "rkllm.runtime_version is not set (the struct layout depends on it)"
        try:
            abi = abi_for(options.runtime_version)
        except ValueError as exc:
            return False, str(exc)
        library = _find_library(options.library)
        if library is None or not library.exists():
            return False, f"{options.library} not found (copy librkllmrt.so to /usr/lib)"
        reported = library_version(library)
        if reported is not None and abi_for(reported).name != abi.name:
            return False, (
                f"{library} says it is runtime {reported}, but rkllm.runtime_version is "
                f"{options.runtime_version}"
            )
        try:
            ctypes.CDLL(str(library))
        except OSError as exc:
            return False, f"cannot load {library}: {exc}"
        if options.model is None or not options.model.is_file():
            return False, f"rkllm.model {options.model} is not a file (convert one with rkllm-toolkit)"
        problem = gguf_problem(settings.model.path)
        if problem:
            return False, f"{problem} (rkllm needs the GGUF of the same model for its tokenizer)"
        return True, f"RKLLM runtime {reported or options.runtime_version} (ABI {abi.name}) on {device}"

    @property
    def model_name(self) -> str:
        return self._settings.model.display_name

    @property
    def n_ctx(self) -> int:
        return self._settings.model.ctx

    def load(self) -> None:
        options = self._options
        try:
            self._abi = abi_for(options.runtime_version or "")
            library = _find_library(options.library)
            self._lib = ctypes.CDLL(str(library))
        except (ValueError, OSError) as exc:
            raise BackendError(f"RKLLM runtime unusable: {exc}") from exc
        abi = self._abi
        _setup(self._lib, abi)
        self._load_tokenizer()
        param = self._lib.rkllm_createDefaultParam()
        param.model_path = str(options.model).encode()
        param.max_context_len = self.n_ctx
        param.max_new_tokens = self._settings.jobs.default_max_tokens
        param.skip_special_token = True
        param.is_async = False
        sampling = self._board.profile.sampling
        param.top_k = sampling.top_k or 1
        param.top_p = sampling.top_p or 0.9
        param.temperature = sampling.temperature if sampling.temperature is not None else 0.6
        param.repeat_penalty = sampling.repeat_penalty or 1.0
        if hasattr(param, "n_keep"):
            param.n_keep = 0  # set every known field: a stale default would hide a layout mismatch
        param.extend_param.base_domain_id = options.base_domain_id
        if hasattr(param.extend_param, "enabled_cpus_mask"):
            cpus = self._board.profile.cpu.affinity or []
            param.extend_param.enabled_cpus_mask = sum(1 << c for c in cpus)
            param.extend_param.enabled_cpus_num = len(cpus)
            param.extend_param.embed_flash = int(options.embed_flash)

        def on_result(result: Any, _userdata: Any, state: int) -> int:
            data = ctypes.cast(result, ctypes.POINTER(abi.result)).contents if result else None
            text = data.text if data is not None and state not in (RUN_ERROR, RUN_FINISH) else None
            perf = None
            if data is not None and state == RUN_FINISH and abi.has_perf:
                p = data.perf
                perf = {
                    "prefill_ms": p.prefill_time_ms,
                    "prefill_tokens": p.prefill_tokens,
                    "generate_ms": p.generate_time_ms,
                    "generate_tokens": p.generate_tokens,
                    "memory_mb": p.memory_usage_mb,
                }
            self._events.put((state, text, perf))
            return 0

        self._callback = abi.callback(on_result)
        if abi.init_takes_callback_struct:
            self._callback_struct = Callback130(result_callback=self._callback)
            rc = self._lib.rkllm_init(byref(self._handle), byref(param), byref(self._callback_struct))
        else:
            rc = self._lib.rkllm_init(byref(self._handle), byref(param), self._callback)
        if rc != 0:
            raise BackendError(f"rkllm_init failed with {rc} (model {options.model}, ABI {abi.name})")
        if hasattr(self._lib, "rkllm_set_chat_template"):
            # edged renders the GGUF's template itself, so the runtime must not add its own.
            self._lib.rkllm_set_chat_template(self._handle, b"", b"", b"")
        log.info("rkllm model loaded", model=str(options.model), abi=abi.name, library=str(library))

    def _load_tokenizer(self) -> None:
        try:
            import llama_cpp
        except (ImportError, OSError, RuntimeError) as exc:  # a broken native library too
            raise BackendError(f"llama-cpp-python (the tokenizer) cannot be imported: {exc}") from exc
        with contextlib.redirect_stderr(io.StringIO()):
            vocab = llama_cpp.Llama(model_path=str(self._settings.model.path), vocab_only=True, verbose=True)
        vocab.verbose = False
        self._prompt = GgufPrompt(vocab)

    def describe(self) -> dict[str, object]:
        return {
            "library": self._options.library,
            "runtime_version": self._options.runtime_version,
            "abi": self._abi.name if self._abi else None,
            "model": str(self._options.model),
            "core_mask": self._options.core_mask,
            "rknn_toolkit_lite2": rknn_lite_info(),
        }

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        assert self._prompt is not None
        return self._prompt.render_chat(messages)

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        assert self._prompt is not None
        return self._prompt.tokenize(text, chat=chat)

    def generate(self, prompt: Prompt, params: SamplingParams, cancel: threading.Event) -> Iterator[str]:
        abi = self._abi
        assert abi is not None
        self.last_perf = None
        while not self._events.empty():
            self._events.get_nowait()
        text = prompt.text.encode("utf-8")
        rk_input = abi.input()
        rk_input.input_type = INPUT_PROMPT
        rk_input.prompt_input = text
        infer = abi.infer()
        infer.mode = INFER_GENERATE
        if hasattr(infer, "max_new_tokens"):
            infer.max_new_tokens = params.max_tokens
        outcome: dict[str, int] = {}

        def run() -> None:
            outcome["rc"] = self._lib.rkllm_run(self._handle, byref(rk_input), byref(infer), None)
            self._events.put((-1, None, None))  # the run returned

        runner = threading.Thread(target=run, name="rkllm-run", daemon=True)
        runner.start()
        produced = 0
        pending = b""
        aborted = False
        while True:
            if (cancel.is_set() or produced >= params.max_tokens) and not aborted:
                self._lib.rkllm_abort(self._handle)
                aborted = True
            try:
                state, piece, perf = self._events.get(timeout=0.1)
            except queue.Empty:
                continue
            if state == RUN_ERROR:
                runner.join(5)
                raise BackendError("the RKLLM runtime reported an error during generation")
            if state == RUN_FINISH:
                self.last_perf = perf
                continue
            if state == -1:
                if outcome.get("rc", 0) != 0 and not aborted:
                    raise BackendError(f"rkllm_run failed with {outcome['rc']}")
                return
            if piece is None or aborted:
                continue
            pending += piece
            if state == RUN_WAITING:
                continue
            try:
                decoded = pending.decode("utf-8")
            except UnicodeDecodeError:
                continue
            pending = b""
            produced += 1
            yield decoded

    def abort(self) -> None:
        if self._lib is not None and self._handle:
            self._lib.rkllm_abort(self._handle)

    def close(self) -> None:
        if self._lib is not None and self._handle:
            self._lib.rkllm_destroy(self._handle)
            self._handle = c_void_p()


def rknn_lite_info() -> dict[str, Any]:
    """Runtime/driver versions from rknn-toolkit-lite2 (the ``npu`` extra, aarch64) when installed."""
    try:
        from rknnlite.api import RKNNLite
    except ImportError:
        return {"installed": False, "note": "not installed (pip install 'edged[npu]' on aarch64)"}
    info: dict[str, Any] = {"installed": True}
    with contextlib.suppress(Exception):
        info["sdk_version"] = str(RKNNLite().get_sdk_version())
    return info
