"""Readers for thermals, CPU/NPU frequency and load, Pi throttling and system figures.

Everything is read under ``board.root`` through `HostFS`, so tests use fixture trees laid out as on
the boards. A missing or unreadable file is reported as absent (None / empty), never an exception.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

from edged.board import HostFS

NPU_LOAD = "/sys/kernel/debug/rknpu/load"
NPU_DEVFREQ = "/sys/class/devfreq/fdab0000.npu"
THROTTLED_NODES = (
    "/sys/devices/platform/soc/soc:firmware/get_throttled",
    "/sys/devices/platform/soc@107c000000/soc@107c000000:firmware/get_throttled",
)
# vcgencmd get_throttled bits: the low nibble is "now", bits 16-19 "since boot".
THROTTLE_FLAGS = {0: "under_voltage", 1: "freq_capped", 2: "throttled", 3: "soft_temp_limit"}


def _int(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class TripPoint:
    type: str
    temp_c: float


@dataclass(frozen=True)
class ThermalZone:
    zone: str
    type: str
    temp_c: float | None
    trips: list[TripPoint] = field(default_factory=list)


@dataclass(frozen=True)
class CpuPolicy:
    policy: str
    cpus: list[int]
    cur_mhz: float | None
    max_mhz: float | None
    hw_max_mhz: float | None

    @property
    def capped(self) -> bool:
        """The clock is limited below what the silicon can do (thermal or power capping)."""
        return self.max_mhz is not None and self.hw_max_mhz is not None and self.max_mhz < self.hw_max_mhz


@dataclass(frozen=True)
class Throttling:
    raw: int
    source: str
    now: dict[str, bool]
    since_boot: dict[str, bool]

    @property
    def active(self) -> bool:
        return any(self.now.values())


def thermal_zones(fs: HostFS) -> list[ThermalZone]:
    base = fs.path("/sys/class/thermal")
    zones: list[ThermalZone] = []
    try:
        entries = sorted(base.glob("thermal_zone*"), key=lambda p: _int(p.name[12:]) or 0)
    except OSError:
        return zones
    for entry in entries:
        prefix = f"/sys/class/thermal/{entry.name}"
        milli = _int(fs.read_text(f"{prefix}/temp"))
        trips = []
        for index in range(32):
            temp = _int(fs.read_text(f"{prefix}/trip_point_{index}_temp"))
            if temp is None:
                break
            kind = (fs.read_text(f"{prefix}/trip_point_{index}_type") or "?").strip()
            trips.append(TripPoint(kind, temp / 1000))
        zones.append(
            ThermalZone(
                zone=entry.name,
                type=(fs.read_text(f"{prefix}/type") or entry.name).strip(),
                temp_c=milli / 1000 if milli is not None else None,
                trips=trips,
            )
        )
    return zones


def cpu_policies(fs: HostFS) -> list[CpuPolicy]:
    base = fs.path("/sys/devices/system/cpu/cpufreq")
    try:
        entries = sorted(base.glob("policy*"), key=lambda p: _int(p.name[6:]) or 0)
    except OSError:
        return []

    def mhz(path: str) -> float | None:
        khz = _int(fs.read_text(path))
        return khz / 1000 if khz is not None else None

    policies = []
    for entry in entries:
        prefix = f"/sys/devices/system/cpu/cpufreq/{entry.name}"
        cpus = [int(c) for c in (fs.read_text(f"{prefix}/related_cpus") or "").split() if c.isdigit()]
        policies.append(
            CpuPolicy(
                entry.name,
                cpus,
                mhz(f"{prefix}/scaling_cur_freq"),
                mhz(f"{prefix}/scaling_max_freq"),
                mhz(f"{prefix}/cpuinfo_max_freq"),
            )
        )
    return policies


def parse_npu_load(text: str) -> dict[str, int]:
    """``NPU load:  Core0: 12%, Core1:  0%, Core2:  0%,`` -> ``{"core0": 12, ...}`` (RK3588 rknpu)."""
    return {f"core{core}": int(pct) for core, pct in re.findall(r"Core(\d+):\s*(\d+)%", text)}


def npu(fs: HostFS) -> dict[str, Any] | None:
    load_text = fs.read_text(NPU_LOAD)
    freq = _int(fs.read_text(f"{NPU_DEVFREQ}/cur_freq"))
    if load_text is None and freq is None:
        return None
    return {
        "load_pct": parse_npu_load(load_text) if load_text is not None else None,
        "freq_mhz": freq / 1_000_000 if freq is not None else None,
    }


def parse_throttled(value: int, source: str) -> Throttling:
    return Throttling(
        raw=value,
        source=source,
        now={name: bool(value >> bit & 1) for bit, name in THROTTLE_FLAGS.items()},
        since_boot={name: bool(value >> (bit + 16) & 1) for bit, name in THROTTLE_FLAGS.items()},
    )


def throttling(fs: HostFS) -> Throttling | None:
    """Raspberry Pi firmware flags: `vcgencmd get_throttled` on the real root, else the sysfs node."""
    if str(fs.root) == "/" and (vcgencmd := shutil.which("vcgencmd")):
        try:
            out = subprocess.run(
                [vcgencmd, "get_throttled"], capture_output=True, text=True, timeout=2
            ).stdout
            match = re.search(r"throttled=0x([0-9a-fA-F]+)", out)
            if match:
                return parse_throttled(int(match.group(1), 16), "vcgencmd")
        except (OSError, subprocess.SubprocessError):
            pass
    for node in THROTTLED_NODES:
        text = fs.read_text(node)
        if text is not None:
            try:
                return parse_throttled(int(text.strip(), 16), node)
            except ValueError:
                continue
    return None


def system(fs: HostFS) -> dict[str, Any]:
    meminfo: dict[str, int] = {}
    for line in (fs.read_text("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        value = _int(rest.split()[0]) if rest.split() else None
        if value is not None:
            meminfo[key] = value
    load = (fs.read_text("/proc/loadavg") or "").split()
    uptime = (fs.read_text("/proc/uptime") or "").split()

    def number(parts: list[str], index: int) -> float | None:
        try:
            return float(parts[index])
        except (IndexError, ValueError):
            return None

    total, available = meminfo.get("MemTotal"), meminfo.get("MemAvailable")
    return {
        "mem_total_mb": round(total / 1024, 1) if total else None,
        "mem_available_mb": round(available / 1024, 1) if available else None,
        "load_1m": number(load, 0),
        "load_5m": number(load, 1),
        "load_15m": number(load, 2),
        "uptime_s": number(uptime, 0),
    }


def read_all(fs: HostFS) -> dict[str, Any]:
    """One JSON-able snapshot of the hardware."""
    zones = thermal_zones(fs)
    throttled = throttling(fs)
    policies = cpu_policies(fs)
    return {
        "zones": [asdict(z) for z in zones],
        "cpufreq": [{**asdict(p), "capped": p.capped} for p in policies],
        "npu": npu(fs),
        "throttling": ({**asdict(throttled), "active": throttled.active} if throttled else None),
        "system": system(fs),
    }
