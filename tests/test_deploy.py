"""The Ansible role renders a configuration edged accepts, and the playbook parses.

The template is rendered twice: in-process with jinja2 and Ansible's own filters (fast, many cases)
and by the real `ansible.builtin.template` module. Every value is escaped (a password with a quote,
a backslash and a newline round-trips through tomllib), the LAN listener and its keys can be
configured, and every task that writes a secret has ``no_log`` and no diff.

(The run over real SSH against a debootstrapped Debian root is in test_ansible_ssh.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml
from conftest import clean_env, run_edged

from edged.config import tomllib  # the one tomllib shim (tomli on Python 3.10)

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = ROOT / "deploy" / "ansible"
ROLE = ANSIBLE / "roles" / "edged"
BIN = Path(sys.executable).parent
TRICKY = 'pa"ss\\word\nnext = "injected"\n[http]\tlisten = "0.0.0.0:1" \u2603 \U0001f600 \x7f\x01 end'
"""A password that ends a TOML string, adds a key and a table, and holds a tab, a snowman, an emoji
(beyond U+FFFF: JSON's surrogate pair escapes are not TOML), DEL and a control character."""


def ansible_env(tmp_path: Path) -> dict[str, str]:
    return clean_env(
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"),
        ANSIBLE_HOME=str(tmp_path / "home"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        PATH=f"{BIN}:{os.environ['PATH']}",
    )


@pytest.mark.system
def test_playbook_syntax(tmp_path: Path) -> None:
    r = subprocess.run(
        [str(BIN / "ansible-playbook"), "--syntax-check", "-i", "inventory.example.yml", "site.yml"],
        cwd=ANSIBLE,
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.system
def test_role_template_renders_a_config_edged_accepts(tmp_path: Path) -> None:
    out = tmp_path / "edged.toml"
    extra = {
        "edged_device_id": "opi5-01",
        "edged_profile": "rk3588",
        "edged_board_root": "/srv/fixtures/orangepi5",
        "edged_mqtt_host": "broker.example",
        "edged_mqtt_port": 8883,
        "edged_mqtt_username": "opi5-01",
        "edged_mqtt_password": TRICKY,
        "edged_model_src": "/srv/models/r1.gguf",
        "edged_model_dir": "/var/lib/edged/models",
        "edged_backend": "auto",
        "edged_queue_max_depth": 8,
        "edged_log_level": "info",
        "edged_mqtt_tls_ca": "",
        "edged_telemetry_interval_s": 10,
        "edged_http_listen": "0.0.0.0:8080",
        "edged_http_api_keys": {"ha": TRICKY, "ci": "sha256:" + "ab" * 32},
        "edged_http_allow_anonymous": False,
    }
    r = subprocess.run(
        [
            str(BIN / "ansible"),
            "localhost",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-m",
            "ansible.builtin.template",
            "-a",
            f"src={ANSIBLE}/roles/edged/templates/edged.toml.j2 dest={out}",
            "-e",
            json.dumps(extra),
        ],
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    shown = run_edged("config", "show", "--json", "--config", str(out))
    assert shown.returncode == 0, shown.stderr
    cfg = json.loads(shown.stdout)
    assert cfg["device_id"] == "opi5-01"
    assert cfg["board"]["profile"] == "rk3588"
    assert cfg["board"]["root"] == "/srv/fixtures/orangepi5"
    assert cfg["mqtt"]["host"] == "broker.example" and cfg["mqtt"]["port"] == 8883
    assert cfg["mqtt"]["password"] == "**********"
    written = tomllib.loads(out.read_text())  # the real template module escapes every value
    assert written["mqtt"]["password"] == TRICKY
    assert written["http"]["api_keys"] == {"ha": TRICKY, "ci": "sha256:" + "ab" * 32}
    assert cfg["http"]["listen"] == "0.0.0.0:8080" and sorted(cfg["http"]["api_keys"]) == ["ci", "ha"]
    assert cfg["model"]["path"] == "/var/lib/edged/models/r1.gguf"
    assert cfg["queue"]["max_depth"] == 8
    assert cfg["log"]["format"] == "json"


# -- in-process rendering ----------------------------------------------------------------------------


def role_defaults() -> dict[str, Any]:
    return yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())


def render(**variables: Any) -> str:
    """templates/edged.toml.j2 as ansible.builtin.template renders it (trim_blocks, Ansible's
    to_json/basename/bool filters) over the role's defaults and ``variables``."""
    from ansible.plugins.filter.core import FilterModule

    ansible_filters = FilterModule().filters()
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(ROLE / "templates"),
        trim_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update({name: ansible_filters[name] for name in ("to_json", "basename", "bool")})
    values = {
        **role_defaults(),
        "ansible_managed": "Ansible managed",
        "edged_device_id": "box-17",
        "edged_mqtt_username": "box-17",
        **variables,
    }
    return env.get_template("edged.toml.j2").render(**values)


def accepted(tmp_path: Path, text: str) -> dict[str, Any]:
    """What `edged config show --json` makes of ``text`` (it must accept it)."""
    path = tmp_path / "edged.toml"
    path.write_text(text)
    shown = run_edged("config", "show", "--json", "--config", str(path))
    assert shown.returncode == 0, shown.stderr + text
    return json.loads(shown.stdout)


@pytest.mark.system
def test_every_value_is_escaped_so_a_secret_round_trips(tmp_path: Path) -> None:
    keys = {"ha": 'k3y"with\\quote\n[mqtt]\npassword = "x"', "ci": "sha256:" + "ab" * 32}
    text = render(
        edged_mqtt_host="broker.example",
        edged_mqtt_password=TRICKY,
        edged_http_listen="0.0.0.0:8080",
        edged_http_api_keys=keys,
        edged_board_root='/srv/"odd"\\root',
        edged_model_src="/srv/models/r1.gguf",
    )
    doc = tomllib.loads(text)
    assert doc["mqtt"]["password"] == TRICKY
    assert doc["http"] == {"listen": "0.0.0.0:8080", "api_keys": keys}, "no key added, none lost"
    tables = {"model", "board", "socket", "queue", "log", "telemetry", "mqtt", "http"}
    assert set(doc) == {"device_id", "backend", *tables}
    assert doc["board"]["root"] == '/srv/"odd"\\root'
    assert doc["model"]["path"] == "/var/lib/edged/models/r1.gguf"
    assert (doc["queue"]["max_depth"], doc["telemetry"]["interval_s"]) == (16, 10.0)
    cfg = accepted(tmp_path, text)
    assert cfg["mqtt"]["password"] == "**********" and cfg["http"]["listen"] == "0.0.0.0:8080"
    assert sorted(cfg["http"]["api_keys"]) == ["ci", "ha"]


@pytest.mark.system
@pytest.mark.parametrize(
    "variables",
    [
        {},  # the defaults: no MQTT, no LAN listener
        {"edged_mqtt_host": "broker.example", "edged_mqtt_port": 8883, "edged_mqtt_password": "pw"},
        {"edged_http_listen": "127.0.0.1:8080"},  # loopback: keys optional
        {"edged_http_listen": "[::]:8080", "edged_http_allow_anonymous": True},
    ],
    ids=["defaults", "mqtt", "loopback-listener", "anonymous-listener"],
)
def test_the_template_renders_configs_edged_accepts(tmp_path: Path, variables: dict[str, Any]) -> None:
    cfg = accepted(tmp_path, render(**variables))
    assert cfg["device_id"] == "box-17"
    assert cfg["http"]["listen"] == (variables.get("edged_http_listen") or None)
    assert cfg["http"]["allow_anonymous"] is bool(variables.get("edged_http_allow_anonymous"))
    assert cfg["mqtt"]["host"] == (variables.get("edged_mqtt_host") or None)


def tasks_of(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every task, those inside blocks included."""
    found = []
    for item in items:
        nested = [t for key in ("block", "rescue", "always") for t in item.get(key, [])]
        found += tasks_of(nested) if nested else [item]
    return found


def test_every_task_that_writes_a_secret_has_no_log_and_no_diff() -> None:
    """A secret is a role variable named like one (password, api_keys, secret, token); a task that
    mentions it, or templates a file that does, must not print it (no_log) nor diff it."""
    secrets = {name for name in role_defaults() if re.search(r"password|api_keys|secret|token", name)}
    assert {"edged_mqtt_password", "edged_http_api_keys"} <= secrets
    tasks = tasks_of(yaml.safe_load((ROLE / "tasks" / "main.yml").read_text()))
    checked = []
    for task in tasks:
        text = yaml.safe_dump(task)
        template = task.get("ansible.builtin.template") or task.get("template")
        if template is not None:
            text += (ROLE / "templates" / template["src"]).read_text()
        if any(name in text for name in secrets):
            checked.append(task["name"])
            assert task.get("no_log") is True, f"{task['name']!r} handles a secret without no_log"
            assert task.get("diff") is False, f"{task['name']!r} would show a secret with --diff"
    assert "Write /etc/edged/edged.toml" in checked, checked


def test_the_role_keeps_the_socket_group_apart_from_the_secrets() -> None:
    """API users join edged-clients (the socket's group); group edged reads edged.toml; the state
    directory (the journal) is the service's alone."""
    tasks = tasks_of(yaml.safe_load((ROLE / "tasks" / "main.yml").read_text()))

    def module(task: dict[str, Any], name: str) -> dict[str, Any] | None:
        return task.get(f"ansible.builtin.{name}")

    groups = [module(t, "group")["name"] for t in tasks if module(t, "group") is not None]  # type: ignore[index]
    assert "edged-clients" in groups and "edged" in groups
    config = next(module(t, "template") for t in tasks if module(t, "template") is not None)
    assert config is not None and (config["group"], config["mode"]) == ("edged", "0640")
    state = [module(t, "file") for t in tasks if (module(t, "file") or {}).get("path") == "/var/lib/edged"]
    assert state == [
        {"path": "/var/lib/edged", "state": "directory", "owner": "edged", "group": "edged", "mode": "0700"}
    ]
