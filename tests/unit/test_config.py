"""Config errors in-process: each names the field, its value and its source - except a secret's value,
which is masked wherever it came from (`_shown_value`). The CLI's exit 78 is tests/test_config.py's."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from edged.config import HIDDEN, Settings, _shown_value, load_settings
from edged.errors import ConfigError


@pytest.mark.parametrize(
    "loc",
    [
        ("mqtt", "password"),
        ("http", "api_keys", "ha"),
        ("http", "tls", "key"),
        ("mqtt", "tls", "key"),
        ("telemetry", "token"),
        ("x", "Secret"),
        ("http", "API_KEYS", 0),
    ],
)
def test_a_value_under_a_secret_setting_is_masked(loc: tuple[str | int, ...]) -> None:
    assert _shown_value(loc, "hunter2-hunter2-hunter2") == f" = {HIDDEN}"
    assert _shown_value(loc, ["k3y-in-a-list-1234"]) == f" = {HIDDEN}"
    assert _shown_value(loc, 1234567890) == f" = {HIDDEN}"


def test_other_values_are_shown_as_written_and_sections_not_at_all() -> None:
    assert _shown_value(("model", "ctx"), "4096") == " = '4096'"
    assert _shown_value(("model", "ctx"), 4096) == " = 4096"
    assert _shown_value(("http", "api_keys_file"), "/etc/keys") == " = '/etc/keys'", "a path, no secret"
    assert _shown_value(("mqtt", "keepalive_s"), "soon") == " = 'soon'"
    assert _shown_value(("mqtt",), {"password": "hunter2"}) == "", "a whole section is never printed"
    assert _shown_value(("mqtt", "password"), {"nested": "hunter2"}) == ""


def problems(settings_of: Callable[..., Settings], **overrides: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        settings_of(**overrides)
    return info.value.problems


def test_load_settings_masks_a_wrong_typed_secret_and_names_the_rest(settings_of) -> None:
    lines = problems(
        settings_of,
        mqtt={"password": 987654321, "keepalive_s": "soon"},
        http={"listen": "127.0.0.1:8080", "api_keys": {"ha": 1234567890123456789}},
    )
    text = "\n".join(lines)
    assert "mqtt.password = ********** (from command line)" in text
    assert "http.api_keys.ha = ********** (from command line)" in text
    assert "mqtt.keepalive_s = 'soon' (from command line)" in text
    assert "987654321" not in text and "1234567890123456789" not in text
    assert len(lines) == 3, "one line per problem"


def test_the_source_named_is_where_the_value_came_from(settings_of, monkeypatch: pytest.MonkeyPatch) -> None:
    make = settings_of  # clears EDGED_* first; then this test's own
    monkeypatch.setenv("EDGED_MODEL__CTX", "big")
    (line,) = problems(make)
    assert line.startswith("model.ctx = 'big' (from environment EDGED_MODEL__CTX): ")
    monkeypatch.setenv("EDGED_MODEL__CTX", "1024")
    assert make().model.ctx == 1024
    assert make(model={"ctx": 512}).model.ctx == 512, "flags beat the environment"


def test_a_mistyped_variable_is_named_not_ignored(settings_of, monkeypatch: pytest.MonkeyPatch) -> None:
    make = settings_of
    monkeypatch.setenv("EDGED_MODLE__PATH", "/x")
    assert problems(make) == [
        "EDGED_MODLE__PATH: unknown setting 'modle' (from environment EDGED_MODLE__PATH)"
    ]


def test_a_device_cannot_be_called_fleet(settings_of) -> None:
    (line,) = problems(settings_of, device_id="fleet")
    assert line.startswith("device_id = 'fleet'") and "fleet/jobs" in line
    assert settings_of(device_id="fleet-1").device_id == "fleet-1"


def test_context_overflow_defaults_per_api_and_their_overrides(
    settings_of, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """Ollama's routes trim a long chat's oldest turns (as Ollama does, which Home Assistant relies
    on); OpenAI's and MQTT's refuse it; each is configurable (file, environment) and checked."""
    overflow = settings_of().jobs.context_overflow
    assert (overflow.openai, overflow.ollama, overflow.mqtt) == ("error", "trim_history", "error")
    assert [overflow.of(f) for f in ("openai", "ollama", "mqtt", None)] == [
        "error",
        "trim_history",
        "error",
        "error",
    ]
    monkeypatch.setenv("EDGED_JOBS__CONTEXT_OVERFLOW__MQTT", "trim_history")
    assert settings_of().jobs.context_overflow.of("mqtt") == "trim_history"
    monkeypatch.delenv("EDGED_JOBS__CONTEXT_OVERFLOW__MQTT")
    config = tmp_path / "own.toml"
    config.write_text('[jobs.context_overflow]\nollama = "error"\nopenai = "trim_history"\n')
    own = load_settings(config, {}).jobs.context_overflow
    assert (own.openai, own.ollama, own.mqtt) == ("trim_history", "error", "error")
    (line,) = problems(settings_of, jobs={"context_overflow": {"ollama": "drop"}})
    assert line.startswith("jobs.context_overflow.ollama = 'drop' (from command line)"), line


def test_the_kv_cache_type_and_its_need_of_flash_attention(
    settings_of, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert settings_of().llamacpp.kv_type == "f16"
    monkeypatch.setenv("EDGED_LLAMACPP__KV_TYPE", "q8_0")
    assert settings_of().llamacpp.kv_type == "q8_0"
    (line,) = problems(settings_of, llamacpp={"flash_attn": False})
    assert "llamacpp.kv_type = 'q8_0' needs llamacpp.flash_attn = true" in line, line
    monkeypatch.delenv("EDGED_LLAMACPP__KV_TYPE")
    assert settings_of(llamacpp={"flash_attn": False}).llamacpp.kv_type == "f16"
    (line,) = problems(settings_of, llamacpp={"kv_type": "q5_1"})
    assert line.startswith("llamacpp.kv_type = 'q5_1'"), line
