"""Does this CPU have the instructions the installed llama.cpp was compiled for?

A llama-cpp-python built with ``-march=armv8.2-a+dotprod`` (RK3588, Pi 5) dies of SIGILL on a Pi 4's
Cortex-A72 the first time it runs an SDOT or an LSE atomic, and an AVX2 build does the same on an old
x86. Wheels from ``make wheelhouse`` carry ``llama_cpp/edged_build.json`` naming the CPU features their
build assumes; this module reads it *without importing llama_cpp* (the import loads the library) and
compares it with what the kernel says the running CPU has: ``AT_HWCAP``/``AT_HWCAP2`` on aarch64 (the
same source ggml uses, and what qemu reports for the CPU it emulates), the ``flags`` of
``/proc/cpuinfo`` on x86. A llama-cpp-python compiled on the board itself has no such file: nothing
to check.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import json
import platform
from dataclasses import dataclass
from pathlib import Path

BUILD_FILE = "edged_build.json"

# Linux's arch/arm64/include/uapi/asm/hwcap.h: bit -> the name /proc/cpuinfo prints.
HWCAP_AARCH64 = [
    "fp",
    "asimd",
    "evtstrm",
    "aes",
    "pmull",
    "sha1",
    "sha2",
    "crc32",
    "atomics",
    "fphp",
    "asimdhp",
    "cpuid",
    "asimdrdm",
    "jscvt",
    "fcma",
    "lrcpc",
    "dcpop",
    "sha3",
    "sm3",
    "sm4",
    "asimddp",
    "sha512",
    "sve",
    "asimdfhm",
    "dit",
    "uscat",
    "ilrcpc",
    "flagm",
    "ssbs",
    "sb",
    "paca",
    "pacg",
]
HWCAP2_AARCH64 = [
    "dcpodp",
    "sve2",
    "sveaes",
    "svepmull",
    "svebitperm",
    "svesha3",
    "svesm4",
    "flagm2",
    "frint",
    "svei8mm",
    "svef32mm",
    "svef64mm",
    "svebf16",
    "i8mm",
    "bf16",
    "dgh",
    "rng",
    "bti",
    "mte",
]
AT_HWCAP, AT_HWCAP2 = 16, 26


@dataclass(frozen=True)
class LlamaBuild:
    """What ``make wheelhouse`` recorded about the installed llama-cpp-python's compilation."""

    arch: str
    flavour: str
    march: str
    needs: tuple[str, ...]
    boards: str
    path: Path


def installed_build() -> LlamaBuild | None:
    """The installed llama_cpp package's edged_build.json, found without importing the package; None
    when llama_cpp is not installed or was not built by ``make wheelhouse``."""
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / BUILD_FILE
        if path.is_file():
            data = json.loads(path.read_text())
            return LlamaBuild(
                arch=str(data["arch"]),
                flavour=str(data["flavour"]),
                march=str(data["march"]),
                needs=tuple(str(n) for n in data["needs"]),
                boards=str(data.get("boards", "")),
                path=path,
            )
    return None


def _bits(value: int, names: list[str]) -> set[str]:
    return {name for bit, name in enumerate(names) if value >> bit & 1}


def cpu_features(machine: str | None = None, cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The running CPU's features by Linux's names (aarch64: from the auxiliary vector; others: the
    first ``flags``/``Features`` line of /proc/cpuinfo)."""
    machine = machine or platform.machine()
    if machine in ("aarch64", "arm64"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        getauxval = libc.getauxval
        getauxval.restype = ctypes.c_ulong
        getauxval.argtypes = [ctypes.c_ulong]
        return _bits(getauxval(AT_HWCAP), HWCAP_AARCH64) | _bits(getauxval(AT_HWCAP2), HWCAP2_AARCH64)
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def build_problem(build: LlamaBuild | None, machine: str, features: set[str]) -> str | None:
    """Why ``build`` cannot run on this CPU (one line with the fix), or None when it can."""
    if build is None:
        return None
    if build.arch != machine:
        return (
            f"the installed llama-cpp-python was built for {build.arch} ({build.path}), this machine is "
            f"{machine}: install the wheelhouse built for {machine} (make wheelhouse ARCH={machine})"
        )
    missing = [need for need in build.needs if need not in features]
    if not missing:
        return None
    return (
        f"the installed llama-cpp-python {build.flavour} build (-march={build.march}, for {build.boards}) "
        f"needs CPU features this CPU lacks: {', '.join(missing)}; it would die of an illegal "
        "instruction. Install the wheel of this CPU's group from the wheelhouse (the Ansible role "
        "picks it by itself; make wheelhouse lists the groups) or build llama-cpp-python on the board"
    )


def check_llama_cpu() -> str | None:
    """The problem with running the installed llama-cpp-python on this CPU, or None."""
    build = installed_build()
    if build is None:
        return None
    machine = platform.machine()
    return build_problem(build, "aarch64" if machine == "arm64" else machine, cpu_features(machine))


if __name__ == "__main__":  # the Ansible role runs this file on a board to pick its llama.cpp build
    print(json.dumps({"machine": platform.machine(), "features": sorted(cpu_features())}))
