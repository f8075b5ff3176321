"""edged's ctypes layouts of every RKLLM runtime ABI against the same structs compiled by gcc."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import rkllm_abi_flags

from edged.backends.rkllm_abi import ABIS, abi_for
from edged.backends.rkllm_version import OFFICIAL_BLOBS, detect_in_bytes, git_blob_id

SOURCE = Path(__file__).parent / "npu_stub" / "layouts.c"
C_ABI = {"1.1": "110", "1.2.0": "120", "1.2.1b1": "120b1", "1.2.1": "121", "1.3.0": "130"}


def c_layout(tmp_path: Path, abi: str) -> dict[str, int]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is required to build the RKLLM layout probe")
    exe = tmp_path / f"layouts-{abi}"
    subprocess.run(
        [gcc, "-std=c11", "-Wall", "-Werror", *rkllm_abi_flags(abi), "-o", str(exe), str(SOURCE)],
        check=True,
        capture_output=True,
    )
    return json.loads(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout)


def py_value(abi_name: str, key: str) -> int:
    abi = ABIS[abi_name]
    classes = {
        "RKLLMExtendParam": abi.extend,
        "RKLLMParam": abi.param,
        "RKLLMInput": abi.input,
        "RKLLMInferParam": abi.infer,
        "RKLLMResult": abi.result,
    }
    struct, _, name = key.partition(".")
    cls = classes[struct]
    if not name:
        return ctypes.sizeof(cls)
    if name == "prompt_input":
        return cls.u.offset + type(cls().u).prompt_input.offset  # the anonymous union
    return getattr(cls, name).offset


@pytest.mark.system
@pytest.mark.parametrize("abi_name", list(C_ABI))
def test_ctypes_layout_matches_gcc(tmp_path: Path, abi_name: str) -> None:
    layout = c_layout(tmp_path, C_ABI[abi_name])
    assert len(layout) >= 14
    mismatches = {k: (v, py_value(abi_name, k)) for k, v in layout.items() if py_value(abi_name, k) != v}
    assert mismatches == {}, f"{abi_name}: C vs ctypes {mismatches}"


def test_layouts_really_differ_between_releases(tmp_path: Path) -> None:
    sizes = {name: ctypes.sizeof(abi.param) for name, abi in ABIS.items()}
    assert len(set(sizes.values())) >= 3, sizes


@pytest.mark.parametrize(
    ("version", "abi"),
    [
        ("1.1.4", "1.1"),
        ("v1.1.0", "1.1"),
        ("1.2.0", "1.2.0"),
        ("1.2.1b1", "1.2.1b1"),
        ("1.2.1", "1.2.1"),
        ("1.2.3", "1.2.1"),
        ("1.3.0", "1.3.0"),
    ],
)
def test_version_to_abi(version: str, abi: str) -> None:
    assert abi_for(version).name == abi


@pytest.mark.parametrize("version", ["1.0.1", "1.2.4", "1.4.0", "2.0", "latest", "", "1.2.2b1", "1.3.1"])
def test_unknown_runtime_versions_are_refused(version: str) -> None:
    with pytest.raises(ValueError, match="unsupported RKLLM runtime version"):
        abi_for(version)


def test_the_1_2_1b1_abi_is_1_2_0_with_the_larger_multimodal_input() -> None:
    b1, old, new = ABIS["1.2.1b1"], ABIS["1.2.0"], ABIS["1.2.1"]
    assert ctypes.sizeof(b1.input) == 56 and ctypes.sizeof(old.input) == 32 and ctypes.sizeof(new.input) == 64
    assert (b1.param, b1.infer, b1.result, b1.callback) == (old.param, old.infer, old.result, old.callback)
    assert not b1.callback_returns_int and not b1.has_perf


# The strings of the official 1.2.1b1 aarch64 librkllmrt.so (git blob db041c01), in .rodata order,
# as published in Luna-Inference/open-rkllm analyze/strings.txt; the other layouts as the releases log.
REAL_121B1 = (
    b"\x00RKLLM SDK (version: 1.2.1b1 | target: Linux | build: 27637c95 2025-05-02 17:46:07)\x00"
    b"rknn llm lib version: 2.3.3b0 (c54da5763@2025-04-18T15:37:10)\x00"
    b"0.9.7\x00stoi\x00W rkllm: Warning: Your rknpu driver version is too low, please upgrade to %s\x00"
    b"Platform error, must be either RK3588, RK3576, RV1126B or RK3562. Your platform is %s\x00"
    b"1.2.1b1\x00I rkllm: rkllm-runtime version: %s, rknpu driver version: %s, platform: %s\x00"
)


@pytest.mark.parametrize(
    ("data", "version", "how"),
    [
        (REAL_121B1, "1.2.1b1", "SDK banner"),
        (REAL_121B1.split(b"\x00", 2)[2], "1.2.1b1", "beside the runtime's log format string"),
        (
            b"\x000.9.7\x001.1.4\x00I rkllm: rkllm-runtime version: %s, rknpu driver version: %s\n\x00",
            "1.1.4",
            "beside",
        ),
        (b"\x00rkllm-runtime version: 1.0.1, rknpu driver version: 0.9.6\x00", "1.0.1", "literal"),
        (b"\x000.9.7\x00I rkllm: rkllm-runtime version: %s\x00", None, "without a version literal"),
        (
            b"\x00rknn llm lib version: 2.3.3b0 (c54da5763)\x00librknnrt version: 2.3.3b0\x00",
            None,
            "no RKLLM",
        ),
    ],
)
def test_version_detection_reads_what_real_releases_carry(data: bytes, version: str | None, how: str) -> None:
    detected = detect_in_bytes(data)
    assert detected.version == version
    assert how in detected.how


def test_an_official_file_is_known_by_its_git_blob_id() -> None:
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object`
    assert set(OFFICIAL_BLOBS.values()) >= {"1.1.4", "1.2.0", "1.2.1b1", "1.2.1", "1.2.2", "1.2.3", "1.3.0"}
    for version in OFFICIAL_BLOBS.values():
        abi_for(version)  # every official release has a layout
