"""The Ansible role renders a configuration edged accepts, and the playbook parses.

(The run over real SSH against a debootstrapped Debian root is still to come; see the README.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import clean_env, run_edged

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = ROOT / "deploy" / "ansible"
BIN = Path(sys.executable).parent


def ansible_env(tmp_path: Path) -> dict[str, str]:
    return clean_env(
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"),
        ANSIBLE_HOME=str(tmp_path / "home"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        PATH=f"{BIN}:{os.environ['PATH']}",
    )


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


def test_role_template_renders_a_config_edged_accepts(tmp_path: Path) -> None:
    out = tmp_path / "edged.toml"
    extra = {
        "edged_device_id": "opi5-01",
        "edged_profile": "rk3588",
        "edged_board_root": "/srv/fixtures/orangepi5",
        "edged_mqtt_host": "broker.example",
        "edged_mqtt_port": 8883,
        "edged_mqtt_username": "opi5-01",
        "edged_mqtt_password": "s3cret",
        "edged_model_src": "/srv/models/r1.gguf",
        "edged_model_dir": "/var/lib/edged/models",
        "edged_backend": "auto",
        "edged_queue_max_depth": 8,
        "edged_log_level": "info",
        "edged_mqtt_tls_ca": "",
        "edged_telemetry_interval_s": 10,
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
    assert cfg["model"]["path"] == "/var/lib/edged/models/r1.gguf"
    assert cfg["queue"]["max_depth"] == 8
    assert cfg["log"]["format"] == "json"
