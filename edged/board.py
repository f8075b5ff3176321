"""Board detection and board profiles.

The board is identified by its device-tree ``compatible`` strings, matched on the SoC entries so a
board nobody listed still gets its SoC's profile. Every file is read under ``board.root`` through
`HostFS`, so tests point edged at fixture trees laid out exactly as on the real boards.
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edged.config import SamplingConfig
from edged.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GENERIC = "generic"


class HostFS:
    """Reads host files under a root directory, resolving absolute symlinks inside that root.

    On a real board ``/proc/device-tree`` is a symlink to ``/sys/firmware/devicetree/base``; in a
    fixture tree the same absolute link must land inside the fixture, not on the test machine.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, absolute: str, _depth: int = 0) -> Path:
        if _depth > 40:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", absolute)
        current = self.root
        for part in PurePosixPath(absolute).parts[1:]:
            current = current / part
            if current.is_symlink():
                target = os.readlink(current)
                if target.startswith("/"):
                    current = self.path(target, _depth + 1)
        return current

    def read_bytes(self, absolute: str) -> bytes | None:
        """The file's bytes, or None when it is absent or unreadable (never an exception)."""
        try:
            return self.path(absolute).read_bytes()
        except OSError:
            return None

    def read_text(self, absolute: str) -> str | None:
        data = self.read_bytes(absolute)
        return None if data is None else data.decode("utf-8", errors="replace")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MatchRule(_Strict):
    compatible: list[str] = Field(default_factory=list, description="Device-tree compatible strings (SoC).")
    cpuinfo: list[str] = Field(
        default_factory=list,
        description="Substrings of /proc/cpuinfo's Model/Hardware lines (no device tree).",
    )


class BackendOrder(_Strict):
    order: list[str] = Field(min_length=1, description="Backends to try, best first.")


class CpuPlan(_Strict):
    threads: int | None = Field(None, ge=1, description="Generation threads; unset = cores in affinity.")
    affinity: list[int] | None = Field(None, description="CPU numbers to run on; unset = all allowed.")


class ThermalLimits(_Strict):
    zones: list[str] = Field(default_factory=list, description="Thermal zone types to watch; empty = all.")
    warn_c: float = Field(description="Log and report a warning above this temperature.")
    derate_c: float = Field(description="Slow generation down above this temperature.")
    pause_c: float = Field(description="Stop taking new jobs above this temperature.")
    resume_c: float = Field(description="Take jobs again below this temperature (hysteresis).")

    @model_validator(mode="after")
    def _ordered(self) -> ThermalLimits:
        if not self.resume_c < self.warn_c <= self.derate_c < self.pause_c:
            raise ValueError(
                "need resume_c < warn_c <= derate_c < pause_c, got "
                f"{self.resume_c} / {self.warn_c} / {self.derate_c} / {self.pause_c}"
            )
        return self


class EnginePlan(_Strict):
    parallel: int = Field(
        4, ge=1, le=16, description="Sequences decoded together by default (engine.parallel = 'auto')."
    )


class Profile(_Strict):
    """One ``board_profiles/<name>.toml``."""

    name: str = Field(pattern=r"^[a-z0-9_-]+$", description="Profile name; equals the file stem.")
    description: str = Field("", description="One line for humans.")
    match: MatchRule = Field(default_factory=MatchRule, description="How the board is recognised.")
    backends: BackendOrder = Field(description="Backend preference.")
    cpu: CpuPlan = Field(default_factory=CpuPlan, description="Threads and CPU affinity.")
    thermal: ThermalLimits = Field(description="Zones and temperature thresholds.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Model-family sampling.")
    engine: EnginePlan = Field(default_factory=EnginePlan, description="Scheduler defaults for this board.")


@dataclass(frozen=True)
class LoadedProfile:
    profile: Profile
    origin: Path


def shipped_profiles_dir() -> Path:
    """Profiles inside the installed wheel, or the source tree's ``board_profiles/``."""
    packaged = Path(str(resources.files("edged"))) / "board_profiles"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "board_profiles"


def load_profiles(user_dir: Path | None) -> dict[str, LoadedProfile]:
    """All profiles by name; a user's file replaces the shipped one of the same name."""
    profiles: dict[str, LoadedProfile] = {}
    problems: list[str] = []
    for directory in (shipped_profiles_dir(), user_dir):
        if directory is None or not directory.is_dir():
            continue
        for file in sorted(directory.glob("*.toml")):
            try:
                data = tomllib.loads(file.read_text(encoding="utf-8"))
                profile = Profile.model_validate(data)
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                problems.append(f"{file}: cannot read TOML: {exc}")
                continue
            except ValidationError as exc:
                for err in exc.errors():
                    where = ".".join(str(p) for p in err["loc"]) or "(profile)"
                    problems.append(f"{file}: {where}: {err['msg']}")
                continue
            if profile.name != file.stem:
                problems.append(f"{file}: name = {profile.name!r} must equal the file name {file.stem!r}")
                continue
            profiles[profile.name] = LoadedProfile(profile, file)
    if problems:
        raise ConfigError(problems)
    if GENERIC not in profiles:
        raise ConfigError([f"no '{GENERIC}' profile in {shipped_profiles_dir()} (broken installation)"])
    return profiles


@dataclass(frozen=True)
class BoardInfo:
    """What was detected and which profile it selected, with the reason."""

    model: str | None
    compatible: list[str]
    soc: str | None
    source: str
    profile: Profile
    profile_origin: Path
    reason: str
    root: Path
    cpuinfo_model: str | None = None
    notes: list[str] = field(default_factory=list)


def _cpuinfo_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("Model", "Hardware") and value.strip():
            fields.setdefault(key.strip(), value.strip())
    return fields


def _nul_strings(data: bytes | None) -> list[str]:
    if not data:
        return []
    return [part.decode("utf-8", errors="replace") for part in data.split(b"\0") if part]


def detect_board(root: Path, profile_name: str = "auto", user_dir: Path | None = None) -> BoardInfo:
    """Read the device tree (or cpuinfo) under ``root`` and select a profile."""
    fs = HostFS(root)
    profiles = load_profiles(user_dir)

    source = "device-tree"
    compatible = _nul_strings(fs.read_bytes("/proc/device-tree/compatible"))
    model_bytes = fs.read_bytes("/proc/device-tree/model")
    if not compatible:
        compatible = _nul_strings(fs.read_bytes("/sys/firmware/devicetree/base/compatible"))
        model_bytes = fs.read_bytes("/sys/firmware/devicetree/base/model")
        source = "sysfs-devicetree"
    models = _nul_strings(model_bytes)
    model = models[0] if models else None
    cpuinfo = _cpuinfo_fields(fs.read_text("/proc/cpuinfo") or "")
    cpuinfo_model = cpuinfo.get("Model") or cpuinfo.get("Hardware")
    if not compatible:
        source = "cpuinfo" if cpuinfo_model else "none"
        model = model or cpuinfo_model

    def ordered() -> list[LoadedProfile]:
        user_first = sorted(profiles.values(), key=lambda lp: (lp.origin.parent != user_dir, lp.profile.name))
        return [lp for lp in user_first if lp.profile.name != GENERIC]

    soc = compatible[-1] if compatible else None
    chosen: LoadedProfile | None = None
    reason = ""
    if profile_name != "auto":
        if profile_name not in profiles:
            known = ", ".join(sorted(profiles))
            raise ConfigError([f"board.profile = {profile_name!r}: no such profile (known: {known})"])
        chosen = profiles[profile_name]
        reason = "forced by board.profile"
    elif compatible:
        for lp in ordered():
            hit = next((c for c in compatible if c in lp.profile.match.compatible), None)
            if hit:
                chosen, soc, reason = lp, hit, f"device tree compatible {hit!r}"
                break
    elif cpuinfo_model:
        for lp in ordered():
            hit = next((s for s in lp.profile.match.cpuinfo if s in cpuinfo_model), None)
            if hit:
                chosen, reason = lp, f"/proc/cpuinfo {cpuinfo_model!r} contains {hit!r}"
                break
    if chosen is None:
        chosen = profiles[GENERIC]
        if compatible:
            reason = f"no profile matches compatible {compatible}"
        elif source == "cpuinfo":
            reason = f"no device tree; no profile matches cpuinfo {cpuinfo_model!r}"
        else:
            reason = "no device tree and no board model in /proc/cpuinfo"
    return BoardInfo(
        model=model,
        compatible=compatible,
        soc=soc,
        source=source,
        profile=chosen.profile,
        profile_origin=chosen.origin,
        reason=reason,
        root=Path(root),
        cpuinfo_model=cpuinfo_model,
    )


@dataclass(frozen=True)
class CpuAssignment:
    threads: int
    affinity: list[int] | None
    note: str


def plan_cpus(profile: Profile, threads_override: int | None) -> CpuAssignment:
    """Threads and cores for generation on *this* machine, saying what was adjusted and why."""
    allowed = sorted(os.sched_getaffinity(0))
    wanted = profile.cpu.affinity
    affinity: list[int] | None = None
    note = "all allowed cores"
    if wanted:
        present = [cpu for cpu in wanted if cpu in allowed]
        if present:
            affinity = present
            note = f"cores {present} from profile {profile.name}"
            if len(present) < len(wanted):
                note += f" (profile asks {wanted}; only {present} exist here)"
        else:
            note = (
                f"profile {profile.name} asks cores {wanted}, none exist here ({allowed}); affinity unchanged"
            )
    cores = len(affinity) if affinity else len(allowed)
    if threads_override:
        threads = threads_override
        note += f"; threads {threads} from model.threads"
    elif profile.cpu.threads and profile.cpu.threads > cores:
        threads = cores
        note += f"; threads {cores} (profile asks {profile.cpu.threads}, only {cores} cores here)"
    else:
        threads = profile.cpu.threads or cores
    return CpuAssignment(threads=threads, affinity=affinity, note=note)
