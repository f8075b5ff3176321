"""Model faults at start: a missing file, a truncated GGUF, a file that is not a GGUF, an architecture
llama.cpp does not know and a model larger than the memory left end `edged serve` with exit 78 and
one line on stderr, before the socket is bound (or, with another backend in the profile, that one
serves and /status says why llamacpp was skipped). The real daemon runs on files made here."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import numpy as np
import pytest
from conftest import BOARDS, Daemon, edged_exe
from nspawn_helpers import CACHE
from test_npu import build_stub, npu_env

from edged.backends.gguf_prompt import load_model
from edged.backends.model_check import (
    ARCHITECTURES,
    ARCHITECTURES_FROM,
    GGML_TYPE_SIZES,
    ModelFault,
    first_native_error,
    mem_available,
    memory_need,
    read_gguf,
)

FAULT_TIMEOUT_S = 60
"""Most a refused start may take (it takes about a second: no model is loaded)."""
ROOT = Path(__file__).resolve().parent.parent


def vendored_arch_source() -> str:
    """llama.cpp's llama-arch.cpp in the llama-cpp-python source release the pin names, read from the
    archive `make wheelhouse` downloads (scripts/wheelhouse.py's `llama_sdist`, the same cache as the
    arm64 test: downloaded once)."""
    spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "scripts" / "wheelhouse.py")
    assert spec is not None and spec.loader is not None
    wheelhouse = importlib.util.module_from_spec(spec)
    sys.modules["wheelhouse"] = wheelhouse  # dataclasses look their module up there
    spec.loader.exec_module(wheelhouse)
    version = llama_cpp.__version__
    sdist = wheelhouse.llama_sdist(version, CACHE / "wheelhouse")
    with tarfile.open(sdist) as archive:
        member = archive.extractfile(f"llama_cpp_python-{version}/vendor/llama.cpp/src/llama-arch.cpp")
        assert member is not None
        return member.read().decode()


def serve(tmp_path: Path, model: Path | str, **env: str) -> subprocess.CompletedProcess[str]:
    """`edged serve` on ``model`` with the test daemon's settings (conftest's Daemon), run to its end."""
    workdir = tmp_path / "daemon"
    workdir.mkdir(exist_ok=True)
    d = Daemon(workdir, EDGED_MODEL__PATH=str(model), **env)
    try:
        return subprocess.run(
            [edged_exe(), "serve"], env=d.env, capture_output=True, text=True, timeout=FAULT_TIMEOUT_S
        )
    finally:
        shutil.rmtree(d.socket.parent, ignore_errors=True)


def refused(r: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 78 with one line on stderr naming the problem, and nothing served: the line."""
    assert r.returncode == 78, f"exit {r.returncode}\nstderr: {r.stderr}\nlog: {r.stdout[-3000:]}"
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("edged: "), line
    for word in words:
        assert word in line, line
    events = [json.loads(x)["event"] for x in r.stdout.splitlines() if x.startswith("{")]
    assert "listening" not in events, "the fault must be found before the socket is bound"
    return line


def small_memory_root(tmp_path: Path, board: str = "x86", available_kb: int = 200_000) -> Path:
    """A copy of a fixture board whose /proc/meminfo says only ``available_kb`` is available."""
    root = tmp_path / f"{board}-small-memory"
    shutil.copytree(BOARDS / board, root, symlinks=True)
    meminfo = root / "proc" / "meminfo"
    text = meminfo.read_text()
    meminfo.write_text(re.sub(r"(?m)^MemAvailable:.*$", f"MemAvailable:   {available_kb} kB", text))
    return root


def tiny_gguf(path: Path, arch: str, *, hparams: bool = False, **kw: Any) -> Path:
    """A GGUF of one small tensor, written by the gguf package's own writer."""
    writer = gguf.GGUFWriter(str(path), arch, **kw)
    writer.add_block_count(1)
    if hparams:
        writer.add_context_length(128)
        writer.add_embedding_length(8)
        writer.add_feed_forward_length(16)
        writer.add_head_count(2)
    writer.add_tensor("foo.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def half_of(model_path: Path, out: Path) -> Path:
    with model_path.open("rb") as src, out.open("wb") as dst:
        dst.write(src.read(model_path.stat().st_size // 2))
    return out


# -- the five faults, through the real `edged serve` ------------------------------------------------


@pytest.mark.system
def test_missing_file_exits_78(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.gguf"
    refused(serve(tmp_path, missing), str(missing), "no such file", "EDGED_MODEL__PATH")


@pytest.mark.system
def test_truncated_gguf_exits_78(tmp_path: Path, model_path: Path) -> None:
    half = half_of(model_path, tmp_path / "half.gguf")
    line = refused(serve(tmp_path, half), str(half), "truncated", "fetch the file again")
    assert f"need {model_path.stat().st_size} bytes but the file has {half.stat().st_size}" in line


@pytest.mark.system
def test_text_file_exits_78(tmp_path: Path) -> None:
    text = tmp_path / "model.gguf"
    text.write_text("this is a shopping list, not a model\n")
    refused(serve(tmp_path, text), str(text), "not a GGUF file", "b'this'")


@pytest.mark.system
def test_unsupported_architecture_exits_78(tmp_path: Path) -> None:
    model = tiny_gguf(tmp_path / "odd.gguf", "notanarch")
    refused(serve(tmp_path, model), str(model), "architecture 'notanarch'", "not one llama.cpp")


@pytest.mark.system
def test_model_larger_than_memory_exits_78(tmp_path: Path, model_path: Path) -> None:
    """MemAvailable of 200 MB under board.root: the 98 MB model and its 189 MB of KV cache (4 slots of
    2048 tokens) do not fit. Nothing is allocated to find out."""
    root = small_memory_root(tmp_path)
    line = refused(serve(tmp_path, model_path, EDGED_BOARD__ROOT=str(root)), str(model_path))
    assert "needs about 0.29 GB of memory (model file 98 MB + KV cache 0.19 GB for 4 streams" in line
    assert "only 0.20 GB is available (MemAvailable in /proc/meminfo)" in line
    # One slot of 1024 tokens fits: the estimate follows the settings.
    ok = mem_available((root / "proc" / "meminfo").read_text())
    assert ok is not None and memory_need(read_gguf(model_path), slots=1, n_ctx=1024).total < ok
    # A quantized KV cache (llamacpp.kv_type) fits where f16 does not: q8_0 takes 34/64 of its bytes.
    info = read_gguf(model_path)
    f16 = memory_need(info, slots=4, n_ctx=2048).kv_bytes
    q8 = memory_need(info, slots=4, n_ctx=2048, kv_type="q8_0").kv_bytes
    assert f16 and q8 and abs(q8 / f16 - 34 / 64) < 0.01


@pytest.mark.system
def test_forced_backend_names_the_fault_on_one_line(tmp_path: Path, model_path: Path) -> None:
    half = half_of(model_path, tmp_path / "half.gguf")
    refused(serve(tmp_path, half, EDGED_BACKEND="llamacpp"), "forced by config", "truncated", str(half))


@pytest.mark.system
def test_with_another_backend_it_serves_and_status_says_why(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    """A profile that tries llamacpp first and then the NPU: the model does not fit in memory for
    llamacpp, so rkllm (the stand-in runtime) serves, and /status keeps llamacpp's reason."""
    root = small_memory_root(tmp_path, "orangepi5")
    (root / "dev").mkdir()
    (root / "dev" / "rknpu").write_text("")
    rk_model = tmp_path / "model.rkllm"
    rk_model.write_bytes(b"RKLLM stand-in model")
    lib = build_stub(tmp_path, "121", "1.2.1")
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    shipped = (Path(__file__).parent.parent / "board_profiles" / "rk3588.toml").read_text()
    mine = shipped.replace('order = ["rkllm", "llamacpp"]', 'order = ["llamacpp", "rkllm"]')
    assert mine != shipped
    (profiles / "rk3588.toml").write_text(mine)
    d = start_daemon(**npu_env(root, lib, rk_model), EDGED_BOARD__PROFILES_DIR=str(profiles))
    with d.client() as c:
        backend = c.get("/status").json()["backend"]
    assert backend["name"] == "rkllm"
    skipped = backend["considered"][0]
    assert skipped["name"] == "llamacpp" and skipped["available"] is False
    assert "needs about" in skipped["reason"] and "MemAvailable" in skipped["reason"]
    assert d.stop() == 0


# -- past the pre-load check: llama.cpp's own refusal, with its reason ------------------------------


@pytest.mark.system
def test_a_refusal_by_llama_cpp_itself_is_logged_with_its_reason(tmp_path: Path) -> None:
    """A 'llama' GGUF without the hyperparameters llama.cpp needs passes the header check; llama.cpp
    returns NULL and the error says what it logged (not "see the log lines above")."""
    model = tiny_gguf(tmp_path / "hollow.gguf", "llama", hparams=True)
    r = serve(tmp_path, model)
    errors = [json.loads(x) for x in r.stdout.splitlines() if '"model failed to load"' in x]
    assert errors, r.stdout
    assert errors[0]["error"] == (
        f"model.path {model}: llama.cpp could not load it: error loading model hyperparameters: key not "
        "found in model: llama.attention.layer_norm_rms_epsilon; check that it is a complete GGUF of a "
        "model llama.cpp supports (the llama.cpp log has more)"
    )
    assert r.returncode == 78


@pytest.mark.system
def test_a_refusal_by_llama_cpp_itself_exits_78(tmp_path: Path) -> None:
    model = tiny_gguf(tmp_path / "hollow.gguf", "llama", hparams=True)
    r = serve(tmp_path, model)
    assert r.returncode == 78, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "llama.cpp could not load it: error loading model hyperparameters" in lines[0]


@pytest.mark.system
def test_the_memory_check_can_be_turned_off(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    root = small_memory_root(tmp_path)
    d = start_daemon(EDGED_BOARD__ROOT=str(root), EDGED_LLAMACPP__MEMORY_CHECK="false")
    with d.client() as c:
        assert c.get("/status").json()["backend"]["name"] == "llamacpp"


# -- the check itself ---------------------------------------------------------------------------------


@pytest.mark.system
def test_normal_models_pass_on_this_machine(model_path: Path) -> None:
    """The embedded model (and the R1-shaped 1.5B model of `edged bench`, if built) with 4 slots of
    2048 tokens fit in this machine's MemAvailable (header read time is reported, not asserted)."""
    available = mem_available(Path("/proc/meminfo").read_text())
    assert available is not None
    r1 = Path.home() / ".cache" / "edged" / "r1-shaped-q4_k_m.gguf"
    for path in (model_path, *([r1] if r1.is_file() else [])):
        started = time.perf_counter()
        info = read_gguf(path)
        print(f"{path.name}: header read in {(time.perf_counter() - started) * 1000:.0f} ms")
        assert info.data_end == info.file_size, "every tensor sized: the data ends where the file does"
        need = memory_need(info, slots=4, n_ctx=2048)
        assert need.kv_bytes is not None and need.total < available


@pytest.mark.system
def test_kv_estimate_matches_llama_cpp(model_path: Path) -> None:
    """The header's figure is the backend's: n_layer x n_head_kv x head_dim x (K+V) x f16 (from the
    loaded model: a vocabulary-only load has no hyperparameters, and llama_model_n_head aborts)."""
    lc = llama_cpp
    model = load_model(model_path)
    try:
        n_head = lc.llama_model_n_head(model)
        expected = (
            lc.llama_model_n_layer(model)
            * lc.llama_model_n_head_kv(model)
            * (lc.llama_model_n_embd(model) // n_head)
            * 2
            * 2
        )
    finally:
        lc.llama_model_free(model)
    assert read_gguf(model_path).kv_bytes_per_token() == expected == 23040


@pytest.mark.system
def test_every_prefix_of_a_real_model_is_refused(tmp_path: Path, model_path: Path) -> None:
    """Cut anywhere (inside the magic, the header, the vocabulary, the tensor data): a fault naming
    the truncation, never a pass and never another exception."""
    size = model_path.stat().st_size
    header = read_gguf(model_path).data_offset
    cuts = sorted({*range(0, 64), *range(64, header, max(1, header // 40)), *range(header, size, size // 40)})
    copy = tmp_path / "cut.gguf"
    shutil.copyfile(model_path, copy)
    for cut in reversed(cuts):  # shrinking the one copy in place
        os.truncate(copy, cut)
        with pytest.raises(ModelFault) as caught:
            read_gguf(copy)
        message = caught.value.message
        assert str(copy) in message and "\n" not in message
        assert ("truncated" in message) or ("not a GGUF file" in message and cut < 4), (cut, message)


@pytest.mark.parametrize(
    ("head", "words"),
    [
        (b"PK\x03\x04" + bytes(60), "not a GGUF file but a zip archive"),
        (b"ggjt" + bytes(60), "an old GGML model"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"__metadata__": {}}', "a safetensors file"),
        (b"GGUF\x01\x00\x00\x00" + bytes(56), "GGUF version 1"),
        (b"GGUF\x09\x00\x00\x00" + bytes(56), "GGUF version 9; this llama.cpp reads versions 2 and 3"),
        (b"GGUF\x03\x00\x00\x00" + (2**40).to_bytes(8, "little") * 2 + bytes(40), "more than a file"),
    ],
)
def test_headers_llama_cpp_would_refuse(tmp_path: Path, head: bytes, words: str) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(head)
    with pytest.raises(ModelFault, match=re.escape(words)):
        read_gguf(path)


def test_big_endian_gguf_is_named(tmp_path: Path) -> None:
    model = tiny_gguf(tmp_path / "be.gguf", "llama", endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(ModelFault, match="a big-endian GGUF"):
        read_gguf(model)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    outcome: list[str] = []

    def check() -> None:
        with pytest.raises(ModelFault) as caught:
            read_gguf(fifo)
        outcome.append(caught.value.message)

    reader = threading.Thread(target=check, daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "read_gguf blocked on a FIFO"
    assert "not a regular file" in outcome[0]


def test_ggml_type_sizes_match_the_gguf_package() -> None:
    sizes = {int(t): blocks for t, blocks in gguf.constants.GGML_QUANT_SIZES.items()}
    assert {t: sizes[t] for t in GGML_TYPE_SIZES} == GGML_TYPE_SIZES


@pytest.mark.system
def test_architectures_are_llama_cpp_s() -> None:
    """The list is the pinned llama-cpp-python's; a new pin must bring a new list."""
    assert llama_cpp.__version__ == ARCHITECTURES_FROM, "refresh model_check.ARCHITECTURES for this llama.cpp"
    source = vendored_arch_source()
    table = source[source.index("LLM_ARCH_NAMES = {") : source.index("};", source.index("LLM_ARCH_NAMES"))]
    names = set(re.findall(r'\{\s*LLM_ARCH_\w+,\s*"([^"]+)"\s*\}', table))
    assert names - {"clip", "(unknown)"} == ARCHITECTURES


def test_first_native_error_is_the_cause() -> None:
    lines = [
        "llama_model_load: error loading model: tensor 'blk.15.attn_output.weight' data is not within "
        "the file bounds, model is corrupted or incomplete",
        "llama_model_load_from_file_impl: failed to load model",
    ]
    assert first_native_error(lines) == (
        "tensor 'blk.15.attn_output.weight' data is not within the file bounds, "
        "model is corrupted or incomplete"
    )
    assert first_native_error(["gguf_init_from_reader: failed to read header"]) == "failed to read header"
    assert first_native_error([]) is None
    assert {"llama", "qwen2", "qwen3", "gemma3", "phi3"} <= ARCHITECTURES
