#!/usr/bin/env python3
"""Build a wheelhouse: edged and every dependency as wheels for one board architecture, so a fleet
installs from it in seconds per board and never compiles on a board (a Pi 4 needs the better part of
an hour for llama-cpp-python).

    make wheelhouse ARCH=aarch64            # dist/wheelhouse-aarch64/ (RK3588, Raspberry Pi 4/5)
    make wheelhouse ARCH=x86_64             # dist/wheelhouse-x86_64/
    .venv/bin/python scripts/wheelhouse.py --help

llama-cpp-python has no wheels on PyPI: it is compiled here, cross-compiled for aarch64 with Debian's
g++-aarch64-linux-gnu (scripts/system-deps.sh installs it), once per CPU group, because the compiler
flags decide which instructions the library uses and a board without them dies of SIGILL:

    aarch64  dotprod  -march=armv8.2-a+dotprod  RK3588 (Cortex-A76 + A55), Raspberry Pi 5 (A76)
    aarch64  armv8    -march=armv8-a            Raspberry Pi 4 (Cortex-A72), Pi 3 / Zero 2 (A53)
    x86_64   avx2     SSE4.2 AVX AVX2 FMA F16C BMI2 (llama.cpp's non-native default)

Each group's wheel carries its group as a local version (``0.3.36+dotprod``) and an
``llama_cpp/edged_build.json`` naming the CPU features it needs; edged checks them at start (a clear
error instead of an illegal instruction) and the Ansible role picks the group a board can run.
Every other dependency is downloaded as a wheel for the target (pip's --platform/--python-version/
--abi); rknn-toolkit-lite2 (the ``npu`` extra) is added for aarch64. Compiled wheels are cached
(``--cache``), so a second build takes seconds.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.utils import parse_wheel_filename
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: edged's own dependency there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LLAMA = "llama-cpp-python"
RKNN_LITE = "rknn-toolkit-lite2==2.5.0"
CROSS = {"aarch64": "aarch64-linux-gnu", "x86_64": "x86_64-linux-gnu"}
err = Console(stderr=True)


@dataclass(frozen=True)
class Flavour:
    """One CPU group's build of llama-cpp-python."""

    name: str
    march: str
    cmake: tuple[str, ...]
    needs: tuple[str, ...]
    """CPU features (Linux's names: /proc/cpuinfo, AT_HWCAP) the build's instructions assume."""
    boards: str


FLAVOURS: dict[str, tuple[Flavour, ...]] = {
    # armv8.2-a makes the compiler use LSE atomics and RDM anywhere, and ggml's dot products SDOT.
    "aarch64": (
        Flavour(
            "dotprod",
            "armv8.2-a+dotprod",
            ("-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod",),
            ("fp", "asimd", "crc32", "atomics", "asimdrdm", "asimddp"),
            "RK3588 / RK3588S (Cortex-A76 + A55), Raspberry Pi 5 (Cortex-A76)",
        ),
        Flavour(
            "armv8",
            "armv8-a",
            ("-DGGML_CPU_ARM_ARCH=armv8-a",),
            ("fp", "asimd"),
            "Raspberry Pi 4 (Cortex-A72), Pi 3 / Zero 2 W (Cortex-A53)",
        ),
    ),
    "x86_64": (
        Flavour(
            "avx2",
            "x86-64 with SSE4.2 AVX AVX2 FMA F16C BMI2",
            ("-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON"),
            ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"),
            "x86_64 since Intel Haswell / AMD Excavator (2013-2015)",
        ),
    ),
}


@dataclass
class Manifest:
    arch: str
    python: str
    glibc: str
    edged: str
    llama_cpp_python: str
    flavours: list[dict[str, object]] = field(default_factory=list)
    wheels: list[dict[str, object]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def run(cmd: list[str], what: str, **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        err.print(f"[red]wheelhouse: {what} failed[/] ({' '.join(cmd[:6])} ...):")
        err.print((r.stdout + r.stderr)[-4000:], markup=False, highlight=False)
        raise SystemExit(1)
    return r


def platform_tags(arch: str, glibc: str) -> list[str]:
    """The wheel platforms a glibc ``glibc`` system of ``arch`` runs, newest first (PEP 600)."""
    major, minor = (int(p) for p in glibc.split("."))
    if major != 2:
        raise SystemExit(f"wheelhouse: --glibc {glibc}: only glibc 2.x is known")
    tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, 16, -1)]
    return [*tags, f"manylinux2014_{arch}", f"linux_{arch}"]


def project_versions() -> tuple[str, str]:
    """edged's version and the llama-cpp-python version it pins, from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [d for d in project["dependencies"] if d.startswith(f"{LLAMA}==")]
    assert len(pins) == 1, f"pyproject.toml must pin exactly one {LLAMA} version: {pins}"
    return project["version"], pins[0].split("==", 1)[1]


@functools.cache
def compiler_for(arch: str) -> tuple[list[str], str]:
    """CMake arguments for a cross build (none when building for this machine) and the compiler's
    version line (part of the cache key)."""
    if arch == platform.machine():
        cc = shutil.which("gcc") or "cc"
        return [], run([cc, "--version"], "gcc --version").stdout.splitlines()[0]
    prefix = CROSS[arch]
    gcc, gxx = shutil.which(f"{prefix}-gcc"), shutil.which(f"{prefix}-g++")
    if gcc is None or gxx is None:
        raise SystemExit(
            f"wheelhouse: cross-compiling for {arch} needs {prefix}-gcc and {prefix}-g++ "
            f"(Debian: apt install g++-{prefix}; scripts/system-deps.sh installs them)"
        )
    args = [
        "-DCMAKE_SYSTEM_NAME=Linux",
        f"-DCMAKE_SYSTEM_PROCESSOR={arch}",
        f"-DCMAKE_C_COMPILER={gcc}",
        f"-DCMAKE_CXX_COMPILER={gxx}",
    ]
    return args, run([gxx, "--version"], f"{gxx} --version").stdout.splitlines()[0]


def llama_sdist(version: str, cache: Path) -> Path:
    sdist = cache / "src" / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        sdist.parent.mkdir(parents=True, exist_ok=True)
        err.print(f"downloading the {LLAMA} {version} source")
        run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d",
             str(sdist.parent), f"{LLAMA}=={version}"],
            f"downloading the {LLAMA} source",
        )  # fmt: skip
    return sdist


def compile_llama(sdist: Path, cmake_args: list[str], label: str, work: Path) -> Path:
    """pip wheel on the source with CMAKE_ARGS, its ninja steps shown as a progress bar."""
    env = {
        **os.environ,
        "CMAKE_ARGS": " ".join(cmake_args),
        "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1),
    }
    out = work / "built"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(out), str(sdist)]
    log = work / "build.log"
    step = re.compile(rb"^\s*\[(\d+)/(\d+)\]")
    with (
        log.open("wb") as sink,
        Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(), console=err, transient=False,
        ) as progress,
    ):  # fmt: skip
        task = progress.add_task(f"compiling {LLAMA} ({label})", total=None)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            sink.write(line)
            m = step.match(line)
            if m:
                progress.update(task, completed=int(m.group(1)), total=int(m.group(2)))
        code = proc.wait()
    if code != 0:
        err.print(f"[red]wheelhouse: compiling {LLAMA} ({label}) failed[/]; the end of {log}:")
        err.print(log.read_text(errors="replace")[-4000:], markup=False, highlight=False)
        raise SystemExit(1)
    return next(out.glob("llama_cpp_python-*.whl"))


def relabel(wheel: Path, version: str, flavour: Flavour, arch: str, dest: Path, work: Path) -> Path:
    """The built wheel as ``<version>+<flavour>`` for ``linux_<arch>``, with llama_cpp/edged_build.json
    (what edged's start-up check reads), by the `wheel` tool's unpack / pack / tags."""
    wheel_cli = [sys.executable, "-m", "wheel"]
    unpacked = work / "unpacked"
    run([*wheel_cli, "unpack", "-d", str(unpacked), str(wheel)], "wheel unpack")
    tree = next(unpacked.iterdir())
    local = f"{version}+{flavour.name}"
    info = next(tree.glob("*.dist-info"))
    metadata = info / "METADATA"
    text = metadata.read_text()
    text = re.sub(r"^Version: .*$", f"Version: {local}", text, count=1, flags=re.MULTILINE)
    metadata.write_text(text)
    info.rename(tree / f"llama_cpp_python-{local}.dist-info")
    build = {
        "arch": arch,
        "flavour": flavour.name,
        "march": flavour.march,
        "needs": list(flavour.needs),
        "boards": flavour.boards,
        "cmake_args": list(flavour.cmake),
    }
    (tree / "llama_cpp" / "edged_build.json").write_text(json.dumps(build, indent=2) + "\n")
    packed = work / "packed"
    packed.mkdir()
    run([*wheel_cli, "pack", "-d", str(packed), str(tree)], "wheel pack")
    built = next(packed.glob("*.whl"))
    if not built.name.endswith(f"-linux_{arch}.whl"):  # a cross build comes out tagged for this machine
        run([*wheel_cli, "tags", "--remove", "--platform-tag", f"linux_{arch}", str(built)], "wheel tags")
        built = next(packed.glob("*.whl"))
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / built.name
    shutil.move(built, final)
    return final


def check_elf(wheel: Path, arch: str) -> None:
    """Every shared library in the wheel is built for ``arch`` (read from the ELF header)."""
    machines = {"aarch64": 183, "x86_64": 62}
    with zipfile.ZipFile(wheel) as z:
        libs = [n for n in z.namelist() if re.search(r"\.so(\.\d+)*$", n)]
        if not libs:
            raise SystemExit(f"wheelhouse: {wheel.name} has no shared library")
        for name in libs:
            head = z.open(name).read(20)
            machine = int.from_bytes(head[18:20], "little")
            if head[:4] != b"\x7fELF" or machine != machines[arch]:
                raise SystemExit(
                    f"wheelhouse: {wheel.name}: {name} is not an {arch} ELF (e_machine {machine})"
                )


def build_llama(
    arch: str, flavour: Flavour, version: str, cache: Path, out: Path, seconds: dict[str, float]
) -> Path:
    cross, compiler = compiler_for(arch)
    cmake = [*cross, "-DGGML_NATIVE=OFF", *flavour.cmake]
    key = hashlib.sha256(json.dumps([version, arch, cmake, compiler]).encode()).hexdigest()[:12]
    cached_dir = cache / "llama" / f"{version}-{arch}-{flavour.name}-{key}"
    cached = sorted(cached_dir.glob("*.whl"))
    start = time.monotonic()
    if cached:
        err.print(f"{LLAMA} {version}+{flavour.name}: cached ({cached_dir})")
        wheel = cached[0]
    else:
        sdist = llama_sdist(version, cache)
        with tempfile.TemporaryDirectory(prefix="edged-wheelhouse-") as tmp:
            built = compile_llama(sdist, cmake, f"{arch}, {flavour.name}: -march={flavour.march}", Path(tmp))
            wheel = relabel(built, version, flavour, arch, Path(tmp) / "final", Path(tmp))
            check_elf(wheel, arch)
            cached_dir.mkdir(parents=True, exist_ok=True)
            wheel = Path(shutil.copy2(wheel, cached_dir / wheel.name))
    seconds[f"llama-cpp-python+{flavour.name}"] = round(time.monotonic() - start, 1)
    return Path(shutil.copy2(wheel, out / wheel.name))


def build_edged(out: Path) -> Path:
    with tempfile.TemporaryDirectory(prefix="edged-wheel-") as tmp:
        run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp, str(ROOT)],
            "building the edged wheel",
        )
        wheel = next(Path(tmp).glob("edged-*.whl"))
        return Path(shutil.copy2(wheel, out / wheel.name))


def download_deps(edged_wheel: Path, arch: str, python: str, glibc: str, out: Path, extra: list[str]) -> None:
    """Every dependency of edged as a wheel for the target (llama-cpp-python found in ``out``).
    pip evaluates environment markers on this machine, so what a marker keeps off it (the npu
    extra's ``platform_machine == 'aarch64'``) is named in ``extra``. A dependency published only as
    a source archive (sdnotify) is built here when it is pure Python (a ``none-any`` wheel runs
    anywhere); one with compiled code and no wheel for the target stops the build."""
    abi = "cp" + python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--dest", str(out),
           "--find-links", str(out), "--python-version", python, "--implementation", "cp", "--abi", abi,
           "--abi", "abi3", "--abi", "none"]  # fmt: skip
    for tag in platform_tags(arch, glibc):
        cmd += ["--platform", tag]
    env = {**os.environ, "COLUMNS": "1000"}  # pip's messages unwrapped, to read the missing name
    built: set[str] = set()
    with err.status(f"downloading edged's dependencies as {arch} / CPython {python} wheels"):
        while True:
            r = subprocess.run([*cmd, str(edged_wheel), *extra], capture_output=True, text=True, env=env)
            if r.returncode == 0:
                return
            missing = re.search(r"No matching distribution found for (\S+)", r.stdout + r.stderr)
            if missing is None or missing.group(1) in built:
                err.print("[red]wheelhouse: pip download failed[/]:")
                err.print((r.stdout + r.stderr)[-4000:], markup=False, highlight=False)
                raise SystemExit(1)
            requirement = missing.group(1)
            built.add(requirement)
            with tempfile.TemporaryDirectory(prefix="edged-sdist-") as tmp:
                run(
                    [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp, requirement],
                    f"building {requirement}",
                )
                wheel = next(Path(tmp).glob("*.whl"))
                if not wheel.name.endswith("-none-any.whl"):
                    raise SystemExit(
                        f"wheelhouse: {requirement} has no wheel for {arch} / CPython {python} on the index "
                        f"and is not pure Python ({wheel.name}): it would have to be compiled for the boards"
                    )
                err.print(
                    f"{requirement}: no wheel on the index; built {wheel.name} from its source (pure Python)"
                )
                shutil.copy2(wheel, out / wheel.name)


def check_tags(out: Path, arch: str, python: str, glibc: str) -> list[dict[str, object]]:
    """Each wheel's tags fit the target; returns name, size and SHA-256 of every wheel."""
    platforms = set(platform_tags(arch, glibc)) | {"any"}
    abi = "cp" + python.replace(".", "")
    rows: list[dict[str, object]] = []
    for wheel in sorted(out.glob("*.whl")):
        _, _, _, tags = parse_wheel_filename(wheel.name)
        if not any(t.platform in platforms and t.abi in (abi, "abi3", "none") for t in tags):
            raise SystemExit(f"wheelhouse: {wheel.name} does not run on {arch} CPython {python}")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        rows.append({"wheel": wheel.name, "bytes": wheel.stat().st_size, "sha256": digest})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wheelhouse",
        description=__doc__.split("\n\n")[0],
        epilog="CPU groups: "
        + "; ".join(
            f"{a}: {f.name} (-march={f.march}: {f.boards})" for a, fs in FLAVOURS.items() for f in fs
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--arch", default=platform.machine(), choices=sorted(FLAVOURS), help="target (%(default)s)"
    )
    parser.add_argument("--python-version", default="3.11", help="the boards' Python (%(default)s: bookworm)")
    parser.add_argument("--glibc", default="2.36", help="the boards' glibc (%(default)s: bookworm)")
    parser.add_argument(
        "--flavour",
        action="append",
        help="build only these CPU groups of llama-cpp-python (repeat; default: every group of --arch)",
    )
    parser.add_argument("--out", type=Path, help="output directory (default: dist/wheelhouse-<arch>)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edged" / "wheelhouse",
        help="compiled llama-cpp-python wheels and its source, kept between builds (%(default)s)",
    )
    parser.add_argument("--no-npu", action="store_true", help="leave rknn-toolkit-lite2 out (aarch64)")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")
    args = parser.parse_args(argv)

    arch: str = args.arch
    flavours = FLAVOURS[arch]
    if args.flavour:
        unknown = set(args.flavour) - {f.name for f in flavours}
        if unknown:
            parser.error(f"unknown --flavour {sorted(unknown)} for {arch}: {[f.name for f in flavours]}")
        flavours = tuple(f for f in flavours if f.name in args.flavour)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        parser.error(f"--python-version {args.python_version!r}: give major.minor, e.g. 3.11")
    out: Path = args.out or ROOT / "dist" / f"wheelhouse-{arch}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    edged_version, version = project_versions()
    manifest = Manifest(arch, args.python_version, args.glibc, edged_version, version)
    started = time.monotonic()
    for flavour in flavours:
        wheel = build_llama(arch, flavour, version, args.cache, out, manifest.seconds)
        entry = asdict(flavour)
        entry.update(version=f"{version}+{flavour.name}", wheel=wheel.name)
        manifest.flavours.append(entry)
    t = time.monotonic()
    edged_wheel = build_edged(out)
    extra = [RKNN_LITE] if arch == "aarch64" and not args.no_npu else []
    download_deps(edged_wheel, arch, args.python_version, args.glibc, out, extra)
    manifest.seconds["dependencies"] = round(time.monotonic() - t, 1)
    manifest.wheels = check_tags(out, arch, args.python_version, args.glibc)
    manifest.seconds["total"] = round(time.monotonic() - started, 1)
    (out / "wheelhouse.json").write_text(json.dumps(asdict(manifest), indent=2) + "\n")

    if args.json:
        print(json.dumps(asdict(manifest), indent=2))
        return 0
    table = Table(title=f"{out}: {len(manifest.wheels)} wheels for {arch}, CPython {args.python_version}")
    table.add_column("wheel")
    table.add_column("MB", justify="right")
    for row in manifest.wheels:
        table.add_row(str(row["wheel"]), f"{int(row['bytes']) / 1e6:.1f}")  # type: ignore[call-overload]
    err.print(table)
    for f in manifest.flavours:
        err.print(f"llama-cpp-python {f['version']}: -march={f['march']} for {f['boards']}")
    err.print(f"built in {manifest.seconds['total']:.0f} s; manifest: {out / 'wheelhouse.json'}")
    err.print(f"install with Ansible: edged_wheelhouse={out} (the role picks the CPU group per board)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
