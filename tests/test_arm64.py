"""edged on the boards' own architecture: the aarch64 wheelhouse built on this (x86_64) controller by
`make wheelhouse`'s script, and the Ansible role deploying it over real SSH to an arm64 Debian bookworm
root booted with systemd-nspawn, every arm64 program run by qemu-user through binfmt_misc. Inside, the
container's systemd starts edged on the Orange Pi 5's device tree (a fixture tree laid out as on the
board), `edged ask` is answered, and edged refuses, with a clear error, a llama.cpp build the CPU
cannot run (qemu emulating a Cortex-A72, the Raspberry Pi 4's core).

Slow by nature (everything arm64 is emulated): the arm64 root, the compiled wheels and pip's downloads
are cached in ~/.cache/edged-tests, so only the first run pays for debootstrap and the cross builds."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nspawn_helpers import CACHE, Binfmt, Board, booted, debootstrap_root

from edged.config import embedded_model_path

# cold: debootstrap of an arm64 root (~4 min) + two cross builds of llama.cpp (~4 min each) + the
# playbook under emulation; cached: the playbook and the emulated daemon only
pytestmark = [pytest.mark.system, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "boards" / "orangepi5"
BOARD_ROOT = "/opt/edged-fixtures/orangepi5"
EDGED = "/opt/edged/venv/bin/edged"
PYTHON = "/opt/edged/venv/bin/python"
CONFIG = "--config /etc/edged/edged.toml"
TIMES: dict[str, float | None] = {}


@pytest.fixture(scope="module", autouse=True)
def durations() -> Iterator[None]:
    """The figures for the closing note (cold: nothing cached in ~/.cache/edged-tests); shown with -s."""
    yield
    print(
        "\narm64 test durations (s):",
        json.dumps({k: v if v is None else round(v, 1) for k, v in TIMES.items()}),
    )


@pytest.fixture(scope="module")
def binfmt() -> Iterator[Binfmt]:
    with Binfmt() as registered:
        yield registered


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("wheelhouse") / "wheelhouse-aarch64"
    start = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "wheelhouse.py"),
            "--arch",
            "aarch64",
            "--out",
            str(out),
            "--cache",
            str(CACHE / "wheelhouse"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert r.returncode == 0, r.stderr[-5000:]
    TIMES["wheelhouse_s"] = time.monotonic() - start
    print(r.stderr[-3000:])
    return out, json.loads(r.stdout)


@pytest.fixture(scope="module")
def arm64_board(binfmt: Binfmt, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    base, took = debootstrap_root("bookworm-arm64-minbase", arch="arm64")
    TIMES["debootstrap_s"] = took
    start = time.monotonic()
    with booted(base, tmp_path_factory.mktemp("arm64"), hostname="opi5", boot_s=300) as board:
        TIMES["boot_s"] = time.monotonic() - start
        # the Orange Pi 5's /proc and /sys as the board has them (edged's board.root points there)
        shutil.copytree(FIXTURE, board.root / BOARD_ROOT.lstrip("/"), symlinks=True)
        yield board


def run_playbook(
    board: Board, wheels: Path, tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], float]:
    model = embedded_model_path()
    assert model is not None
    extra = {
        "edged_wheelhouse": str(wheels),
        "edged_build_packages": [],
        "edged_model_src": str(model),
        "edged_pip_index": False,
        "edged_profile": "auto",
        "edged_board_root": BOARD_ROOT,
    }
    return board.playbook(
        "rk3588",
        extra,
        tmp_path,
        timeout=2400,
        ANSIBLE_TIMEOUT="120",
        ANSIBLE_PIPELINING="True",  # one ssh round trip per task: every module's Python runs emulated
    )


def test_the_wheelhouse_holds_aarch64_wheels_for_every_dependency(wheelhouse: tuple[Path, dict]) -> None:
    out, manifest = wheelhouse
    assert manifest["arch"] == "aarch64" and manifest["python"] == "3.11"
    names = sorted(w.name for w in out.glob("*.whl"))
    assert [w["wheel"] for w in manifest["wheels"]] == names
    assert json.loads((out / "wheelhouse.json").read_text()) == manifest
    assert not [n for n in names if "x86_64" in n], names
    assert any(n.startswith("rknn_toolkit_lite2-2.5.0-") and n.endswith("aarch64.whl") for n in names), names
    assert any(n.startswith(f"edged-{manifest['edged']}-") for n in names)
    flavours = {f["name"]: f for f in manifest["flavours"]}
    assert list(flavours) == ["dotprod", "armv8"]  # best first: the role takes the first that fits
    assert "asimddp" in flavours["dotprod"]["needs"] and "asimddp" not in flavours["armv8"]["needs"]
    for flavour in flavours.values():
        wheel = out / flavour["wheel"]
        assert (
            wheel.name
            == f"llama_cpp_python-{flavour['version'].replace('-', '_')}-py3-none-linux_aarch64.whl"
        )
        with zipfile.ZipFile(wheel) as z:
            build = json.loads(z.read("llama_cpp/edged_build.json"))
            assert build["march"] == flavour["march"] and build["needs"] == flavour["needs"]
            libs = [n for n in z.namelist() if re.search(r"/lib[^/]*\.so$", n)]
            assert any(n.endswith("/libllama.so") for n in libs), libs
            for name in libs:  # ELF e_machine 183: EM_AARCH64
                head = z.read(name)[:20]
                assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183, name
    print(f"wheelhouse: {len(names)} wheels, {sum(w['bytes'] for w in manifest['wheels']) / 1e6:.0f} MB")
    for name in names:
        print(f"  {name}")


def test_the_role_deploys_to_an_arm64_host_and_a_second_run_changes_nothing(
    arm64_board: Board, wheelhouse: tuple[Path, dict], tmp_path: Path
) -> None:
    assert arm64_board.ssh("uname -m").stdout.strip() == "aarch64"
    out, _ = wheelhouse
    first, first_s = run_playbook(arm64_board, out, tmp_path)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-2000:]
    assert arm64_board.recap(first.stdout)["failed"] == 0
    assert "llama-cpp-python 0.3.36+dotprod: -march=armv8.2-a+dotprod" in first.stdout, first.stdout[-6000:]
    second, second_s = run_playbook(arm64_board, out, tmp_path)
    assert second.returncode == 0, second.stdout[-6000:]
    assert arm64_board.recap(second.stdout)["changed"] == 0, second.stdout[-6000:]
    TIMES["playbook_first_s"], TIMES["playbook_second_s"] = first_s, second_s
    installed = arm64_board.ssh(f"{PYTHON} -m pip list --format json").stdout
    versions = {re.sub(r"[-_.]+", "-", p["name"]).lower(): p["version"] for p in json.loads(installed)}
    assert versions["llama-cpp-python"] == "0.3.36+dotprod", versions
    assert versions["rknn-toolkit-lite2"] == "2.5.0", versions


def test_edged_answers_inside_the_arm64_host(arm64_board: Board) -> None:
    # importing edged and loading the model, emulated
    state, journal = arm64_board.wait_active("edged.service", within_s=600, poll_s=2)
    assert state == "active", journal
    start = time.monotonic()
    asked = arm64_board.ssh(
        f"{EDGED} ask --socket /run/edged/edged.sock --max-tokens 8 'What is the capital of France?'",
        timeout=600,
    )
    TIMES["ask_s"] = time.monotonic() - start
    assert asked.returncode == 0, asked.stderr + journal
    assert asked.stdout.strip(), asked.stderr
    assert "generated tokens" in asked.stderr
    print(
        f"edged ask inside the arm64 host ({TIMES['ask_s']:.1f} s, emulated):\n{asked.stdout}{asked.stderr}"
    )

    info = arm64_board.ssh(
        f"{PYTHON} -c 'import llama_cpp; print(llama_cpp.llama_print_system_info().decode())'"
    )
    assert info.returncode == 0, info.stderr
    assert "NEON = 1" in info.stdout and "DOTPROD = 1" in info.stdout, info.stdout
    print(f"llama.cpp inside: {info.stdout.strip()}")

    board = arm64_board.ssh(f"{EDGED} board {CONFIG} --json")
    assert board.returncode == 0, board.stderr
    report = json.loads(board.stdout)
    assert report["profile"] == "rk3588" and report["model"] == "Orange Pi 5", report
    considered = {c["name"]: c for c in report["backend"]["considered"]}
    assert considered["rkllm"]["available"] is False
    assert "no NPU device" in considered["rkllm"]["reason"], considered
    assert report["backend"]["name"] == "llamacpp"
    assert report["npu"]["rknn_toolkit_lite2"]["version"] == "2.5.0", report["npu"]
    print(f"edged board: rkllm skipped: {considered['rkllm']['reason']}; npu: {report['npu']}")


def test_a_llama_build_the_cpu_cannot_run_is_refused_with_a_clear_error(
    arm64_board: Board, wheelhouse: tuple[Path, dict]
) -> None:
    """qemu emulating a Cortex-A72 (Raspberry Pi 4: no dot product, no LSE atomics): edged names what
    is missing instead of dying of SIGILL, and the armv8 build the role would pick there runs."""
    a72 = "QEMU_CPU=cortex-a72"
    features = json.loads(arm64_board.ssh(f"{a72} {PYTHON} -m edged.backends.cpu_features").stdout)[
        "features"
    ]
    assert "asimd" in features and "asimddp" not in features and "atomics" not in features, features
    _, manifest = wheelhouse
    fits = [f["name"] for f in manifest["flavours"] if set(f["needs"]) <= set(features)]
    assert fits == ["armv8"], fits  # the role's rule: the first group whose features the CPU has

    refused = arm64_board.ssh(f"{a72} {EDGED} board {CONFIG} --json", timeout=300)
    assert refused.returncode == 78, refused.stdout + refused.stderr
    reason = json.loads(refused.stdout)["backend"]["error"]
    assert "lacks: asimddp" in reason or "asimddp" in reason, reason
    assert "dotprod" in reason and "illegal instruction" in reason, reason
    served = arm64_board.ssh(
        f"{a72} EDGED_JOURNAL__PATH=/tmp/a72.sqlite3 EDGED_SOCKET__PATH=/tmp/a72.sock {EDGED} serve {CONFIG}",
        timeout=300,
    )
    assert served.returncode == 78, served.stdout + served.stderr
    assert "asimddp" in served.stderr, served.stderr

    # What the check prevents: the dotprod build loads and even reports DOTPROD = 1 on this CPU (ggml
    # names what it was compiled with), then dies of SIGILL at the first generation step.
    generate = (
        "import llama_cpp; m = llama_cpp.Llama('/var/lib/edged/models/SmolLM2-135M-Instruct.Q4_1.gguf', "
        "n_ctx=256, n_threads=2, verbose=False); print(repr(m('The capital of France is', max_tokens=3)"
        "['choices'][0]['text']))"
    )
    # (the shell reports the status: ssh itself says only that the remote command died of a signal)
    crashed = arm64_board.ssh(f'{a72} {PYTHON} -c "{generate}"; echo "status=$?"', timeout=300)
    assert "status=132" in crashed.stdout, crashed.stdout + crashed.stderr  # 128 + SIGILL
    assert "Illegal instruction" in crashed.stderr, crashed.stderr

    armv8 = next(f for f in manifest["flavours"] if f["name"] == "armv8")
    install = arm64_board.ssh(
        f"{PYTHON} -m pip install -q --no-deps --target /tmp/armv8 /opt/edged/wheels/{armv8['wheel']}",
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    armv8_env = f"{a72} PYTHONPATH=/tmp/armv8"
    checked = arm64_board.ssh(
        f"{armv8_env} {PYTHON} -c 'from edged.backends.cpu_features import check_llama_cpu, installed_build; "
        "print(installed_build().flavour, check_llama_cpu())'"
    )
    assert checked.stdout.split() == ["armv8", "None"], checked.stdout + checked.stderr
    ran = arm64_board.ssh(f'{armv8_env} {PYTHON} -c "{generate}"', timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.strip().strip("'"), ran.stdout
    print(
        f"on a Cortex-A72: edged refuses the dotprod build: {reason}\n"
        f"the dotprod build run anyway: {crashed.stdout.strip()} ({crashed.stderr.strip()[-80:]})\n"
        f"the armv8 build: {ran.stdout.strip()}"
    )
