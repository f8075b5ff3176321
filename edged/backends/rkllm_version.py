"""Which RKLLM runtime release a ``librkllmrt.so`` is, read from its bytes (nothing is loaded).

A wrong guess is a crash (the struct layouts differ between releases), so detection uses only what the
real releases are known to carry, strongest first:

1. The file's git blob id (``sha1("blob <size>\\0" + bytes)``), compared with the official aarch64 and
   armhf builds published in airockchip/rknn-llm at each release tag: an unmodified official file is
   identified exactly.
2. The SDK banner the 1.2.x/1.3.x builds embed:
   ``RKLLM SDK (version: 1.2.1b1 | target: Linux | build: 27637c95 2025-05-02 17:46:07)``.
3. A literal ``rkllm-runtime version: 1.1.4`` (early builds printed a literal, not a format string).
4. The bare version literal the builds keep next to their log format string
   ``I rkllm: rkllm-runtime version: %s, rknpu driver version: %s, platform: %s`` (the nearest
   version-looking NUL-delimited string before it, never ``0.9.x``, the minimum driver version kept
   beside it).

Never used: ``rknn llm lib version: 2.3.3b0`` / ``librknnrt version:`` (the embedded RKNN library's
version, not RKLLM's) or the first ``version: X.Y.Z`` in the file. Sources per release are in the
README ("RK3588 NPU backend").
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

OFFICIAL_BLOBS: dict[str, str] = {
    # airockchip/rknn-llm, rkllm-runtime/.../librkllm_api/{aarch64,armhf}/librkllmrt.so at release-v<version>
    "66dfdc7c25cdca9ccf9930798118e17abf7592ff": "1.1.0",
    "bfca051375287d0f5aa754a7b8681b4ede52e259": "1.1.1",
    "e8f4afc38c7394beeff83003dbc772412f649a44": "1.1.2",
    "68e79327e82f675413956be615f48c62ccd0f16e": "1.1.3",
    "3bb8cb6172c4c06e1c622c8f8c579888378784f4": "1.1.4",
    "d45ee9b8dcb9ef27d7dd875ce3be3d5e6dfb654d": "1.2.0",
    "db041c01bba5e0e8f624bb2ff50d48825dde1bfc": "1.2.1b1",
    "6b9439d59f2fe4bb8ef5ee2b09c102f1bf993da9": "1.2.1",
    "7025f35825e04ad75d839d10392e3c02cc88e57a": "1.2.1",
    "8ed9cca16f8d5ad8f7cdd7d393de6561182b3395": "1.2.2",
    "d5953fdad6e60521f1dc696f6d638425c93ba08d": "1.2.2",
    "0084abc34ab43359cfa9fd5d4c92ece34127dbd0": "1.2.3",
    "fe1ca6849603a770c54f82d26b826a120c79a01a": "1.2.3",
    "34167b32f99cb7ab19e21fb579fb750d96b878f1": "1.3.0",
    "17c9063b46168c4e7d093d6fedb097874f92d076": "1.3.0",
}

_VERSION = rb"(\d+\.\d+\.\d+(?:[a-z]+\d*)?)"
BANNER = re.compile(
    rb"RKLLM SDK \(version: " + _VERSION + rb" \| target: ([A-Za-z]+) \| build: ([0-9a-f]{6,16})"
)
LITERAL = re.compile(rb"rkllm-runtime version:? v?" + _VERSION + rb"(?![0-9A-Za-z%])")
FORMAT = b"rkllm-runtime version: %s"
BARE = re.compile(rb"(?<=\x00)" + _VERSION + rb"(?=\x00)")
BARE_WINDOW = 512
"""How far before the format string a bare version literal may sit."""


@dataclass(frozen=True)
class Detected:
    version: str | None
    how: str
    """How it was found (or why nothing was), for /status and the refusal messages."""


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def detect_version(path: Path) -> Detected:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Detected(None, f"cannot read {path}: {exc.strerror or exc}")
    return detect_in_bytes(data)


def detect_in_bytes(data: bytes) -> Detected:
    official = OFFICIAL_BLOBS.get(git_blob_id(data))
    if official is not None:
        return Detected(official, f"the official release-v{official} file (git blob id)")
    banner = BANNER.search(data)
    if banner is not None:
        version = banner.group(1).decode()
        return Detected(version, f"SDK banner 'RKLLM SDK (version: {version} | ...'")
    literal = LITERAL.search(data)
    if literal is not None:
        version = literal.group(1).decode()
        return Detected(version, f"literal 'rkllm-runtime version: {version}'")
    at = data.find(FORMAT)
    if at >= 0:
        window = data[max(0, at - BARE_WINDOW) : at]
        found = [m.group(1).decode() for m in BARE.finditer(window)]
        found = [v for v in found if not v.startswith("0.")]
        if found:
            return Detected(
                found[-1], f"version literal '{found[-1]}' beside the runtime's log format string"
            )
        return Detected(None, "the runtime's log format string without a version literal beside it")
    return Detected(None, "no RKLLM version string in the file")
