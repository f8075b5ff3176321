"""Configuration sources, their precedence, and exit 78 with the field named for every invalid case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BOARDS, clean_env, run_edged

pytestmark = pytest.mark.system


def show(*args: str, **env: str) -> dict:
    r = run_edged("config", "show", "--json", *args, env=clean_env(**env))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edged.toml"
    path.write_text(text)
    return path


def test_defaults(model_path: Path) -> None:
    cfg = show()
    assert cfg["model"]["ctx"] == 2048
    assert cfg["model"]["path"] == str(model_path)
    assert cfg["backend"] == "auto"
    assert cfg["board"] == {"profile": "auto", "root": "/", "profiles_dir": "/etc/edged/board_profiles"}
    assert cfg["socket"]["mode"] == "0660"
    assert cfg["queue"]["max_depth"] == 16
    assert cfg["log"] == {"level": "info", "format": "auto", "content": False}
    assert cfg["device_id"]


def test_each_source_and_precedence(tmp_path: Path) -> None:
    file = write(
        tmp_path, 'device_id = "from-file"\n[model]\nctx = 1024\nthreads = 3\n[socket]\nmode = "0600"\n'
    )
    cfg = show("--config", str(file))
    assert (cfg["device_id"], cfg["model"]["ctx"], cfg["model"]["threads"]) == ("from-file", 1024, 3)
    assert cfg["socket"]["mode"] == "0600"
    # the environment beats the file, field by field
    cfg = show("--config", str(file), EDGED_MODEL__CTX="512", EDGED_DEVICE_ID="from-env")
    assert (cfg["device_id"], cfg["model"]["ctx"], cfg["model"]["threads"]) == ("from-env", 512, 3)


def test_flags_beat_the_environment() -> None:
    r = run_edged(
        "board",
        "--json",
        "--root",
        str(BOARDS / "rpi5"),
        env=clean_env(EDGED_BOARD__ROOT=str(BOARDS / "rock5b")),
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["profile"] == "rpi5"
    r = run_edged("serve", "--ctx", "4096", env=clean_env(EDGED_MODEL__CTX="1024"))
    assert r.returncode == 78
    assert "model.ctx = 4096 (from command line)" in r.stderr


def test_toml_nested_sampling_and_backend_section(tmp_path: Path) -> None:
    file = write(tmp_path, "[model.sampling]\ntemperature = 0.2\n[llamacpp]\nbatch = 256\n")
    cfg = show("--config", str(file))
    assert cfg["model"]["sampling"]["temperature"] == 0.2
    assert cfg["llamacpp"]["batch"] == 256


@pytest.mark.parametrize(
    ("toml", "env", "expected"),
    [
        ("[model]\nctx = 4096\n", {}, "model.ctx = 4096 (from file"),
        ("", {"EDGED_MODEL__CTX": "4096"}, "model.ctx = '4096' (from environment EDGED_MODEL__CTX)"),
        ("[model]\nctx = 'big'\n", {}, "model.ctx = 'big' (from file"),
        ("[socket]\nmode = 'rw-'\n", {}, "socket.mode = 'rw-' (from file"),
        ("", {"EDGED_SOCKET__MODE": "0044"}, "socket.mode"),
        ("[model]\nflavour = 'x'\n", {}, "model.flavour = 'x' (from file"),
        ("colour = 1\n", {}, "colour = 1 (from file"),
        ("", {"EDGED_MODEL__FLAVOUR": "x"}, "model.flavour = 'x' (from environment EDGED_MODEL__FLAVOUR)"),
        ("", {"EDGED_MODLE__PATH": "/x"}, "EDGED_MODLE__PATH: unknown setting 'modle'"),
        ("[log]\nlevel = 'loud'\n", {}, "log.level = 'loud' (from file"),
        ("", {"EDGED_ENGINE__PARALLEL": "99"}, "engine.parallel = '99' (from environment EDGED_ENGINE__PAR"),
        ("[engine]\nparallel = 'many'\n", {}, "engine.parallel = 'many' (from file"),
        ("", {"EDGED_QUEUE__MAX_DEPTH": "-1"}, "queue.max_depth = '-1' (from environment"),
        ("device_id = 'a/b'\n", {}, "device_id = 'a/b' (from file"),
        ("[jobs]\ntimeout_s = 7200\n", {}, "jobs (from file"),
        ("[model\nctx = 1\n", {}, "cannot read TOML"),
        # llama.cpp divides the logits by it: 0 fails every job with a grammar (found by fuzzing)
        ("[model.sampling]\nrepeat_penalty = 0\n", {}, "model.sampling.repeat_penalty = 0 (from file"),
    ],
)
def test_invalid_configuration_exits_78_naming_field_value_and_source(
    tmp_path: Path, toml: str, env: dict, expected: str
) -> None:
    file = write(tmp_path, toml)
    r = run_edged("serve", "--config", str(file), env=clean_env(**env))
    assert r.returncode == 78, r.stderr
    assert expected in r.stderr
    assert "Traceback" not in r.stderr


def test_several_problems_one_line_each(tmp_path: Path) -> None:
    file = write(tmp_path, "[model]\nctx = 9999\n[queue]\nmax_depth = 'many'\n")
    r = run_edged("serve", "--config", str(file))
    assert r.returncode == 78
    lines = [line for line in r.stderr.splitlines() if "config error" in line]
    assert len(lines) == 2
    assert any("model.ctx" in line for line in lines) and any("queue.max_depth" in line for line in lines)


def test_missing_config_file_exits_78(tmp_path: Path) -> None:
    r = run_edged("serve", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 78
    assert "no such file" in r.stderr


def test_config_show_plain_lists_dotted_keys() -> None:
    r = run_edged("config", "show", env=clean_env(EDGED_MODEL__CTX="1536"))
    assert r.returncode == 0
    assert "model.ctx = 1536" in r.stdout
    assert 'socket.mode = "0660"' in r.stdout


def test_missing_model_file_is_a_config_error_at_serve(tmp_path: Path) -> None:
    r = run_edged(
        "serve",
        env=clean_env(
            EDGED_MODEL__PATH=str(tmp_path / "missing.gguf"), EDGED_BOARD__ROOT=str(BOARDS / "x86")
        ),
    )
    assert r.returncode == 78
    assert "missing.gguf" in r.stderr


def test_config_errors_never_print_secret_values(tmp_path: Path) -> None:
    """A wrong-typed password or API key is named with its source, its value masked (the value is
    probably the real secret with a typo in its quoting)."""
    file = write(
        tmp_path,
        "[mqtt]\npassword = 987654321\n[http]\nlisten = '127.0.0.1:8080'\n"
        "[http.api_keys]\nha = 1234567890123456789\n[http.tls]\ncert = '/c.pem'\nkey = 55555\n",
    )
    r = run_edged("serve", "--config", str(file))
    assert r.returncode == 78, r.stderr
    assert f"mqtt.password = ********** (from file {file})" in r.stderr
    assert f"http.api_keys.ha = ********** (from file {file})" in r.stderr
    assert "http.tls.key = **********" in r.stderr
    for secret in ("987654321", "1234567890123456789", "55555"):
        assert secret not in r.stderr
    # from the environment too
    r = run_edged("serve", env=clean_env(EDGED_HTTP__API_KEYS='{"ha": ["k3y-in-a-list-1234"]}'))
    assert r.returncode == 78 and "http.api_keys.ha = **********" in r.stderr, r.stderr
    assert "k3y-in-a-list" not in r.stderr
    # other values are still shown
    r = run_edged("serve", env=clean_env(EDGED_MQTT__KEEPALIVE_S="soon"))
    assert r.returncode == 78 and "mqtt.keepalive_s = 'soon'" in r.stderr, r.stderr
