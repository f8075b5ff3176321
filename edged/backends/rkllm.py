"""The RK3588 NPU through Rockchip's RKLLM runtime (``librkllmrt.so``), driven with ctypes.

The struct layouts differ between runtime releases (see `rkllm_abi`), so the runtime version must be
pinned (``rkllm.runtime_version``) and, where the library carries its version string, agree with it.
Prompts are rendered and counted with the tokenizer and chat template of the GGUF of the same model
(``model.path``, loaded vocabulary-only), which is also the CPU fallback's model.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import io
import os
import queue
import threading
from ctypes import byref, c_char_p, c_int, c_void_p
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import structlog

from edged.backends import register_backend
from edged.backends.base import Capabilities, ModelFacts, Prompt, SamplingParams, SeqOutput, SettingsModel
from edged.backends.gguf_prompt import GgufTokenizer, gguf_problem, load_model
from edged.backends.rkllm_abi import (
    INFER_GENERATE,
    INPUT_PROMPT,
    RUN_ERROR,
    RUN_FINISH,
    RUN_WAITING,
    Abi,
    Callback130,
    SamplingParam130,
    abi_for,
)
from edged.backends.rkllm_version import detect_version
from edged.board import HostFS
from edged.config import RkllmConfig, sampling_defaults
from edged.errors import BackendError

if TYPE_CHECKING:
    from edged.board import BoardInfo
    from edged.config import Settings

log = structlog.get_logger(__name__)

RK3588_SOCS = ("rockchip,rk3588", "rockchip,rk3588s")
RK3588_BIG_CORES = (4, 5, 6, 7)
"""The Cortex-A76 cluster: the runtime's CPU work goes there when the profile names no cores."""


@dataclass(frozen=True)
class Runtime:
    """The runtime release edged will drive, and how it knows."""

    version: str
    abi: Abi
    how: str


def resolve_runtime(library: Path, options: RkllmConfig) -> Runtime:
    """The library's release and ABI: detected from its bytes (`rkllm_version`), with
    ``rkllm.runtime_version`` as an override that must agree with what the library says. Raises
    ValueError with both versions named on a disagreement, and refuses a library that says nothing
    recognisable unless ``rkllm.trust_version`` (a wrong layout crashes the process)."""
    detected = detect_version(library)
    pinned = options.runtime_version
    if detected.version is not None:
        found = abi_for(detected.version)  # ValueError: a release edged has no layout for
        if pinned is not None and abi_for(pinned).name != found.name:
            raise ValueError(
                f"{library} says it is runtime {detected.version} ({detected.how}), but "
                f"rkllm.runtime_version is {pinned}: their struct layouts differ (ABI {found.name} vs "
                f"{abi_for(pinned).name}); remove the pin or install the matching library"
            )
        return Runtime(detected.version, found, detected.how)
    if pinned is None:
        raise ValueError(
            f"cannot tell which RKLLM runtime {library} is ({detected.how}); set rkllm.runtime_version "
            "and rkllm.trust_version = true if you are sure (a wrong version crashes edged)"
        )
    if not options.trust_version:
        raise ValueError(
            f"{library} does not say which runtime it is ({detected.how}); rkllm.runtime_version = "
            f"{pinned} is used only with rkllm.trust_version = true (a wrong version crashes edged)"
        )
    return Runtime(pinned, abi_for(pinned), "rkllm.runtime_version, trusted (the library says nothing)")


def npu_device(board: BoardInfo) -> str | None:
    """``/dev/rknpu`` (older kernels) or a DRM node driven by rknpu (newer ones), under ``board.root``."""
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
class RkllmBackend(SettingsModel):
    """Generation on the RK3588 NPU: one sequence at a time (the runtime runs one prompt per handle),
    driven on the engine's backend thread; the runtime's own worker calls back with each token."""

    name: ClassVar[str]
    file_format: ClassVar[str] = "rkllm"

    def __init__(self, board: BoardInfo, settings: Settings) -> None:
        self._board = board
        self._settings = settings
        self._options: RkllmConfig = settings.rkllm
        self._lib: Any = None
        self._handle = c_void_p()
        self._abi: Abi | None = None
        self._init_sampling: dict[str, Any] = {}
        self._runtime: Runtime | None = None
        self._callback: Any = None
        self._callback_struct: Any = None
        self._events: queue.Queue[tuple[int, bytes | None, dict[str, float] | None]] = queue.Queue()
        self._tokenizer: GgufTokenizer | None = None
        self._vocab_model: Any = None
        self._runner: threading.Thread | None = None
        self._run: dict[str, Any] = {}
        self._slot: int | None = None
        self._pending = b""
        self._aborted = False
        self._perf: dict[str, float] | None = None

    @classmethod
    def available(cls, board: BoardInfo, settings: Settings) -> tuple[bool, str]:
        options: RkllmConfig = settings.rkllm
        if board.soc not in RK3588_SOCS and not set(board.compatible) & set(RK3588_SOCS):
            return False, f"not an RK3588 (soc {board.soc or 'unknown'})"
        device = npu_device(board)
        if device is None:
            return False, "no NPU device: neither /dev/rknpu nor a DRM render node driven by rknpu"
        if options.runtime_version is not None:
            try:
                abi_for(options.runtime_version)
            except ValueError as exc:
                return False, str(exc)
        library = _find_library(options.library)
        if library is None or not library.exists():
            return False, f"{options.library} not found (copy librkllmrt.so to /usr/lib)"
        try:
            runtime = resolve_runtime(library, options)
        except ValueError as exc:
            return False, str(exc)
        try:
            ctypes.CDLL(str(library))
        except OSError as exc:
            return False, f"cannot load {library}: {exc}"
        if options.model is None or not options.model.is_file():
            return False, f"rkllm.model {options.model} is not a file (convert one with rkllm-toolkit)"
        problem = gguf_problem(settings.model.path)
        if problem:
            return False, f"{problem} (rkllm needs the GGUF of the same model for its tokenizer)"
        return True, f"RKLLM runtime {runtime.version} (ABI {runtime.abi.name}) on {device}"

    def load(self, slots: int) -> Capabilities:
        options = self._options
        try:
            library = _find_library(options.library)
            if library is None:
                raise ValueError(f"{options.library} not found")
            self._runtime = resolve_runtime(library, options)
            self._abi = self._runtime.abi
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
        # The same defaults as llama.cpp's (fallback < profile < config); top_k 0 is off, as there.
        self._init_sampling = sampling_defaults(self._board.profile.sampling, self._settings.model.sampling)
        param.top_k = int(self._init_sampling["top_k"])
        param.top_p = self._init_sampling["top_p"]
        param.temperature = self._init_sampling["temperature"]
        param.repeat_penalty = self._init_sampling["repeat_penalty"]
        if hasattr(param, "n_keep"):
            param.n_keep = 0  # set every known field: a stale default would hide a layout mismatch
        param.extend_param.base_domain_id = options.base_domain_id
        if hasattr(param.extend_param, "enabled_cpus_mask"):
            cpus = self._board.profile.cpu.affinity or list(RK3588_BIG_CORES)  # never 0 cores / mask 0
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
        facts = ModelFacts(format=self.file_format, chat_template=self.tokenizer.formatter is not None)
        return Capabilities(max_sequences=1, prefix_cache=False, model=facts)

    def _load_tokenizer(self) -> None:
        try:
            import llama_cpp
        except (ImportError, OSError, RuntimeError) as exc:  # a broken native library too
            raise BackendError(f"llama-cpp-python (the tokenizer) cannot be imported: {exc}") from exc
        del llama_cpp
        path = self._settings.model.path
        assert path is not None
        with contextlib.redirect_stderr(io.StringIO()):
            self._vocab_model = load_model(path, vocab_only=True)
        self._tokenizer = GgufTokenizer(self._vocab_model)

    def describe(self) -> dict[str, object]:
        return {
            "library": self._options.library,
            "runtime_version": self._runtime.version if self._runtime else self._options.runtime_version,
            "runtime_detected_by": self._runtime.how if self._runtime else None,
            "abi": self._abi.name if self._abi else None,
            "model": str(self._options.model),
            "core_mask": self._options.core_mask,
            "rknn_toolkit_lite2": rknn_lite_info(),
            "sampling": self.sampling_report(),
            "function_tools": self.function_tools_report(),
        }

    def function_tools_report(self) -> str:
        """Whether this release has the runtime's own function-tools API, and why edged does not use it
        (`edged.backends.rkllm_abi`): the tools are in the prompt edged renders."""
        if self._abi is None:
            return "unknown until the runtime loads"
        if not self._abi.function_tools:
            return f"runtime {self._abi.name} has no rkllm_set_function_tools: edged renders the tools"
        return (
            f"runtime {self._abi.name} has rkllm_set_function_tools, not used: it renders tools only "
            "with the runtime's own chat template, which edged switches off to render the GGUF's "
            "(the tools and earlier calls go into that prompt; the calls are parsed from the text)"
        )

    def job_notes(self, params: SamplingParams) -> list[str]:
        """The job's settings this runtime did not apply, each with what it used instead (never
        silently: the answer carries these)."""
        abi = self._abi.name if self._abi else "?"
        init = self._init_sampling
        notes = []
        if abi != "1.3.0":
            for name in ("temperature", "top_p", "top_k", "repeat_penalty"):
                value = getattr(params, name)
                if name in init and value != init[name]:
                    notes.append(
                        f"{name} {value} not applied: runtime {abi} fixes sampling at init ({init[name]})"
                    )
            for name in ("frequency_penalty", "presence_penalty"):
                if getattr(params, name):
                    notes.append(f"{name} not applied: runtime {abi} fixes sampling at init")
        if params.seed is not None:
            notes.append("seed not applied: the RKLLM runtime takes no seed")
        if params.min_p > 0:
            notes.append("min_p not applied: the RKLLM runtime has no min-p sampling")
        if params.logit_bias:
            notes.append("logit_bias not applied: the RKLLM runtime has no logit bias")
        if params.ignore_eos:
            notes.append("ignore_eos not applied: the RKLLM runtime sets it at init")
        return notes

    def sampling_report(self) -> dict[str, object]:
        """Which sampling settings a job's own values reach, and which the runtime fixed at init."""
        per_job = self._abi is not None and self._abi.name == "1.3.0"
        return {
            "per_job": (
                [
                    "temperature",
                    "top_p",
                    "top_k",
                    "repeat_penalty",
                    "frequency_penalty",
                    "presence_penalty",
                    "max_tokens",
                ]
                if per_job
                else ["max_tokens (edged stops the run)"]
            ),
            "at_init": dict(self._init_sampling),
            "ignored_per_job": (
                ["seed", "min_p", "ignore_eos", "logit_bias"]
                if per_job
                else [
                    "temperature",
                    "top_p",
                    "top_k",
                    "min_p",
                    "repeat_penalty",
                    "frequency_penalty",
                    "presence_penalty",
                    "seed",
                    "ignore_eos",
                    "logit_bias",
                ]
            ),
        }

    def admit(self, slot: int, prompt: Prompt, params: SamplingParams) -> bool:
        abi = self._abi
        assert abi is not None
        if self._slot is not None:
            return False
        while not self._events.empty():
            self._events.get_nowait()
        self._slot, self._pending, self._aborted, self._perf = slot, b"", False, None
        rk_input = abi.input()
        if hasattr(rk_input, "role"):
            rk_input.role = b"user"  # 1.2.1+: as the official demos (the prompt is the whole templated chat)
        rk_input.input_type = INPUT_PROMPT
        rk_input.prompt_input = prompt.text.encode("utf-8")
        infer = abi.infer()
        infer.mode = INFER_GENERATE
        run: dict[str, Any] = {"input": rk_input, "infer": infer}  # kept alive while the runtime runs
        if hasattr(infer, "max_new_tokens"):
            infer.max_new_tokens = params.max_tokens
        if hasattr(infer, "sampling_params"):  # 1.3.0: this job's own sampling, for this run
            sampling = SamplingParam130(
                top_k=params.top_k,
                top_p=params.top_p,
                temperature=params.temperature,
                repeat_penalty=params.repeat_penalty,
                frequency_penalty=params.frequency_penalty,
                presence_penalty=params.presence_penalty,
                mirostat=0,
                mirostat_tau=5.0,  # the official server demo's values (mirostat off)
                mirostat_eta=0.1,
            )
            run["sampling"] = sampling
            infer.sampling_params = ctypes.pointer(sampling)
        self._run = run

        def go() -> None:
            run["rc"] = self._lib.rkllm_run(self._handle, byref(rk_input), byref(infer), None)
            self._events.put((-1, None, None))  # the run returned

        self._runner = threading.Thread(target=go, name="rkllm-run", daemon=True)
        self._runner.start()
        return True

    def step(self) -> list[SeqOutput]:
        """Wait (briefly) for the runtime's next callback; one token, the end, or nothing yet."""
        slot = self._slot
        if slot is None:
            return []
        try:
            state, piece, perf = self._events.get(timeout=0.1)
        except queue.Empty:
            return []
        if state == RUN_ERROR:
            self._join()
            raise BackendError("the RKLLM runtime reported an error during generation")
        if state == RUN_FINISH:
            self._perf = perf
            return []
        if state == -1:
            rc = self._run.get("rc", 0)
            self._join()
            if rc != 0 and not self._aborted:
                raise BackendError(f"rkllm_run failed with {rc}")
            return [SeqOutput(slot=slot, end=True, perf=self._perf)]
        if piece is None or self._aborted:
            return []
        self._pending += piece
        if state == RUN_WAITING:  # the runtime holds back an incomplete UTF-8 character
            return []
        out, self._pending = self._pending, b""
        return [SeqOutput(slot=slot, piece=out, perf=None)]

    def release(self, slot: int) -> dict[str, float] | None:
        if self._slot != slot:
            return None
        if self._runner is not None and self._runner.is_alive():
            self._aborted = True
            self._lib.rkllm_abort(self._handle)
        self._join()
        while not self._events.empty():  # the runtime reports its perf counters as the run ends
            state, _text, perf = self._events.get_nowait()
            if state == RUN_FINISH and perf is not None:
                self._perf = perf
        self._slot = None
        return self._perf

    def _join(self) -> None:
        if self._runner is not None:
            self._runner.join(10)
            if self._runner.is_alive():
                log.error("the RKLLM run did not stop within 10 s of rkllm_abort")
        self._runner = None

    def cache_stats(self) -> None:
        return None

    def interrupt(self) -> None:
        if self._lib is not None and self._handle:
            self._aborted = True
            self._lib.rkllm_abort(self._handle)

    def close(self) -> None:
        if self._lib is not None and self._handle:
            self._lib.rkllm_destroy(self._handle)
            self._handle = c_void_p()
        if self._vocab_model is not None:
            import llama_cpp

            llama_cpp.llama_model_free(self._vocab_model)
            self._vocab_model = None


def rknn_lite_info() -> dict[str, Any]:
    """Version (and, with the NPU runtime present, the SDK's runtime/driver versions) of
    rknn-toolkit-lite2 (the ``npu`` extra, aarch64) when installed."""
    try:
        version = importlib.metadata.version("rknn-toolkit-lite2")
    except importlib.metadata.PackageNotFoundError:
        return {"installed": False, "note": "not installed (pip install 'edged[npu]' on aarch64)"}
    info: dict[str, Any] = {"installed": True, "version": version}
    try:
        from rknnlite.api import RKNNLite
    except Exception as exc:  # installed but broken (a missing system library): say so
        info["error"] = f"rknnlite cannot be imported: {exc}"
        return info
    with contextlib.suppress(Exception):
        sdk = RKNNLite().get_sdk_version()  # None without the NPU runtime (librknnrt.so)
        if sdk is not None:
            info["sdk_version"] = str(sdk)
    return info
