"""edged's ctypes layouts of every RKLLM runtime ABI against the same structs compiled by gcc."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from edged.backends.rkllm_abi import ABIS, abi_for

SOURCE = Path(__file__).parent / "npu_stub" / "layouts.c"
C_ABI = {"1.1": 110, "1.2.0": 120, "1.2.1": 121, "1.3.0": 130}


def c_layout(tmp_path: Path, abi: int) -> dict[str, int]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is required to build the RKLLM layout probe")
    exe = tmp_path / f"layouts-{abi}"
    subprocess.run(
        [gcc, "-std=c11", "-Wall", "-Werror", f"-DRKLLM_ABI={abi}", "-o", str(exe), str(SOURCE)],
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
        ("1.2.1", "1.2.1"),
        ("1.2.3", "1.2.1"),
        ("1.3.0", "1.3.0"),
    ],
)
def test_version_to_abi(version: str, abi: str) -> None:
    assert abi_for(version).name == abi


@pytest.mark.parametrize("version", ["1.0.1", "1.2.4", "1.4.0", "2.0", "latest", ""])
def test_unknown_runtime_versions_are_refused(version: str) -> None:
    with pytest.raises(ValueError, match="unsupported RKLLM runtime version"):
        abi_for(version)
