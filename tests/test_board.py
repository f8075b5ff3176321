"""Board detection against fixture trees laid out as on the real boards, profiles, backend choice."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest
from conftest import BOARDS, clean_env, run_edged

from edged.backends import choose_backend
from edged.board import HostFS, detect_board, load_profiles, plan_cpus, shipped_profiles_dir
from edged.config import load_settings
from edged.errors import BackendUnavailable, ConfigError


@pytest.mark.parametrize(
    ("board", "model", "soc", "profile", "source"),
    [
        ("orangepi5", "Orange Pi 5", "rockchip,rk3588s", "rk3588", "device-tree"),
        ("orangepi5plus", "Orange Pi 5 Plus", "rockchip,rk3588", "rk3588", "device-tree"),
        ("rock5b", "Radxa ROCK 5B", "rockchip,rk3588", "rk3588", "device-tree"),
        ("nanopct6", "FriendlyElec NanoPC-T6", "rockchip,rk3588", "rk3588", "device-tree"),
        ("rpi5", "Raspberry Pi 5 Model B Rev 1.0", "brcm,bcm2712", "rpi5", "device-tree"),
        ("rpi4", "Raspberry Pi 4 Model B Rev 1.4", "brcm,bcm2711", "rpi4", "device-tree"),
        ("rpi4-cpuinfo-only", "Raspberry Pi 4 Model B Rev 1.4", None, "rpi4", "cpuinfo"),
        ("rockpro64", "Pine64 RockPro64 v2.1", "rockchip,rk3399", "generic", "device-tree"),
        ("x86", None, None, "generic", "none"),
    ],
)
def test_detection(board: str, model: str | None, soc: str | None, profile: str, source: str) -> None:
    info = detect_board(BOARDS / board, user_dir=None)
    assert (info.model, info.soc, info.profile.name, info.source) == (model, soc, profile, source)
    assert info.reason


def test_unlisted_rk3588_board_matches_on_the_soc_string() -> None:
    info = detect_board(BOARDS / "nanopct6", user_dir=None)
    assert info.compatible == ["friendlyelec,nanopc-t6", "rockchip,rk3588"]
    assert "rockchip,rk3588" in info.reason


def test_absolute_device_tree_symlink_stays_inside_the_root() -> None:
    root = BOARDS / "rpi5"
    assert os.readlink(root / "proc" / "device-tree") == "/sys/firmware/devicetree/base"
    resolved = HostFS(root).path("/proc/device-tree/compatible")
    assert resolved == root / "sys/firmware/devicetree/base/compatible"
    assert HostFS(root).read_bytes("/proc/device-tree/compatible") == b"raspberrypi,5-model-b\0brcm,bcm2712\0"


def test_sysfs_fallback_when_proc_has_no_device_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(BOARDS / "rock5b", root, symlinks=True)
    (root / "proc" / "device-tree").unlink()
    info = detect_board(root, user_dir=None)
    assert (info.profile.name, info.source) == ("rk3588", "sysfs-devicetree")


def test_profiles_shipped_with_their_contents() -> None:
    profiles = load_profiles(None)
    assert set(profiles) == {"rk3588", "rpi5", "rpi4", "generic"}
    rk = profiles["rk3588"].profile
    assert rk.backends.order[0] == "rkllm" and "llamacpp" in rk.backends.order
    assert rk.cpu.affinity == [4, 5, 6, 7]
    assert profiles["rpi5"].profile.cpu.affinity == [0, 1, 2, 3]
    assert profiles["generic"].profile.cpu.affinity is None
    for lp in profiles.values():
        assert lp.profile.sampling.temperature == 0.6 and lp.profile.sampling.top_p == 0.9
    assert "bigcore0-thermal" in rk.thermal.zones and "package-thermal" in rk.thermal.zones


def test_user_profile_overrides_a_shipped_one(tmp_path: Path) -> None:
    text = (shipped_profiles_dir() / "rpi5.toml").read_text().replace("threads = 4", "threads = 1")
    (tmp_path / "rpi5.toml").write_text(text)
    info = detect_board(BOARDS / "rpi5", user_dir=tmp_path)
    assert info.profile.cpu.threads == 1
    assert info.profile_origin == tmp_path / "rpi5.toml"
    assert plan_cpus(info.profile, None).threads == 1


def test_a_user_profile_for_a_new_soc(tmp_path: Path) -> None:
    text = (shipped_profiles_dir() / "generic.toml").read_text()
    text = text.replace('name = "generic"', 'name = "rk3399"').replace(
        "compatible = []", 'compatible = ["rockchip,rk3399"]'
    )
    (tmp_path / "rk3399.toml").write_text(text)
    assert detect_board(BOARDS / "rockpro64", user_dir=tmp_path).profile.name == "rk3399"


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ('order = ["llamacpp"]', "order = []", "backends.order"),
        ("[cpu]", "[cpu", "cannot read TOML"),
        ('name = "rpi5"', 'name = "other"', "must equal the file name"),
        ("threads = 4", "threads = 4\nturbo = true", "cpu.turbo: Extra inputs are not permitted"),
    ],
)
def test_broken_user_profile_is_a_config_error(tmp_path: Path, old: str, new: str, needle: str) -> None:
    base = (shipped_profiles_dir() / "rpi5.toml").read_text()
    assert old in base
    (tmp_path / "rpi5.toml").write_text(base.replace(old, new))
    with pytest.raises(ConfigError) as info:
        load_profiles(tmp_path)
    assert needle in str(info.value)


def test_thermal_thresholds_must_be_ordered(tmp_path: Path) -> None:
    base = (shipped_profiles_dir() / "rpi5.toml").read_text()
    (tmp_path / "rpi5.toml").write_text(base.replace("resume_c = 68.0", "resume_c = 90.0"))
    with pytest.raises(ConfigError, match="resume_c < warn_c"):
        load_profiles(tmp_path)


def test_forced_profile_and_unknown_profile(tmp_path: Path) -> None:
    assert detect_board(BOARDS / "x86", "rpi4", None).profile.name == "rpi4"
    with pytest.raises(ConfigError, match="no such profile"):
        detect_board(BOARDS / "x86", "nope", None)


@pytest.mark.parametrize(
    ("board", "cpus", "threads", "affinity", "note"),
    [
        # an RK3588 with all eight cores: the four Cortex-A76 (cpu4-7)
        ("rock5b", range(8), 4, [4, 5, 6, 7], "cores [4, 5, 6, 7] from profile rk3588"),
        # the same board in a cgroup/cpuset that allows cpu0-5: two A76 cores are left, and two threads
        (
            "orangepi5",
            range(6),
            2,
            [4, 5],
            "cores [4, 5] from profile rk3588 (profile asks [4, 5, 6, 7]; only [4, 5] exist here)"
            "; threads 2 (profile asks 4, only 2 cores here)",
        ),
        # an RK3588 tree on a 2-core machine: none of cpu4-7 exist, so the affinity is left alone
        (
            "rock5b",
            range(2),
            2,
            None,
            "profile rk3588 asks cores [4, 5, 6, 7], none exist here ([0, 1]); affinity unchanged"
            "; threads 2 (profile asks 4, only 2 cores here)",
        ),
        ("rpi5", range(4), 4, [0, 1, 2, 3], "cores [0, 1, 2, 3] from profile rpi5"),
        ("rpi4-cpuinfo-only", range(4), 4, [0, 1, 2, 3], "cores [0, 1, 2, 3] from profile rpi4"),
        # generic: no affinity, one thread per allowed core
        ("x86", [0, 2, 5], 3, None, "all allowed cores"),
    ],
)
def test_cpu_plan_uses_cores_that_exist(
    monkeypatch: pytest.MonkeyPatch,
    board: str,
    cpus: Iterable[int],
    threads: int,
    affinity: list[int] | None,
    note: str,
) -> None:
    """The real detection and CPU plan for a fixture board, on a machine whose allowed CPUs are ``cpus``."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cpus))
    profile = detect_board(BOARDS / board, user_dir=None).profile
    plan = plan_cpus(profile, None)
    assert (plan.threads, plan.affinity, plan.note) == (threads, affinity, note)
    forced = plan_cpus(profile, 3)
    assert (forced.threads, forced.affinity) == (3, affinity), "model.threads wins, the cores stay"
    assert forced.note == f"{note.split('; threads')[0]}; threads 3 from model.threads"


@pytest.mark.system
def test_auto_choice_skips_backends_with_reasons(model_path: Path) -> None:
    settings = load_settings(None, {"board": {"root": str(BOARDS / "rock5b")}})
    info = detect_board(BOARDS / "rock5b", user_dir=None)
    choice = choose_backend(info, settings)
    assert choice.name == "llamacpp"
    assert choice.considered[0].name == "rkllm" and choice.considered[0].available is False
    assert choice.considered[0].reason


@pytest.mark.system
def test_forced_unavailable_backend_fails_with_its_reason(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    settings = load_settings(None, {"backend": "llamacpp", "model": {"path": str(fake)}})
    with pytest.raises(BackendUnavailable, match="not a GGUF file"):
        choose_backend(detect_board(BOARDS / "x86", user_dir=None), settings)
    r = run_edged(
        "serve",
        env=clean_env(
            EDGED_BACKEND="llamacpp", EDGED_MODEL__PATH=str(fake), EDGED_BOARD__ROOT=str(BOARDS / "x86")
        ),
    )
    assert r.returncode == 78
    assert "forced by config" in r.stderr and "not a GGUF file" in r.stderr


@pytest.mark.system
def test_unknown_backend_name_exits_78() -> None:
    r = run_edged("serve", env=clean_env(EDGED_BACKEND="tpu9000", EDGED_BOARD__ROOT=str(BOARDS / "x86")))
    assert r.returncode == 78
    assert "tpu9000" in r.stderr and "known: llamacpp" in r.stderr


@pytest.mark.system
def test_edged_board_command(tmp_path: Path) -> None:
    r = run_edged("board", "--root", str(BOARDS / "orangepi5"), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["model"] == "Orange Pi 5"
    assert report["soc"] == "rockchip,rk3588s"
    assert report["profile"] == "rk3588"
    assert report["backend"]["name"] == "llamacpp"
    assert [c["name"] for c in report["backend"]["considered"]] == ["rkllm", "llamacpp"]
    assert report["thermal"]["pause_c"] == 85.0
    table = run_edged("board", "--root", str(BOARDS / "orangepi5"))
    assert table.returncode == 0
    assert "rk3588" in table.stdout and "skip rkllm" in table.stdout
