"""Home Assistant MQTT discovery: each board appears in Home Assistant by itself.

Every config carries a ``device`` block and uses the retained status topic for availability.
"""

from __future__ import annotations

from typing import Any

from edged import __version__

# object id -> name, value template over the telemetry JSON, unit, device class
SENSORS: dict[str, tuple[str, str, str | None, str | None]] = {
    "tokens_per_s": ("Decode speed", "{{ value_json.summary.decode_tokens_per_s }}", "tok/s", None),
    "s_per_1k_tokens": ("Seconds per 1k tokens", "{{ value_json.summary.s_per_1k_tokens }}", "s", "duration"),
    "hottest_temp": ("Hottest zone", "{{ value_json.summary.hottest_c }}", "°C", "temperature"),
    "queue_depth": ("Queue depth", "{{ value_json.queue.depth }}", "jobs", None),
    "throttled": ("Throttled", "{{ 1 if value_json.summary.throttled else 0 }}", None, None),
}


def discovery_configs(
    prefix: str, device_id: str, telemetry_topic: str, status_topic: str, presence: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Retained discovery messages by topic."""
    node = f"edged_{device_id}"
    device = {
        "identifiers": [node],
        "name": f"edged {device_id}",
        "manufacturer": "edged",
        "model": f"{presence.get('board') or 'unknown board'} ({presence.get('profile')})",
        "sw_version": __version__,
    }
    configs = {}
    for object_id, (name, template, unit, device_class) in SENSORS.items():
        config: dict[str, Any] = {
            "name": name,
            "unique_id": f"{node}_{object_id}",
            "object_id": f"{node}_{object_id}",
            "state_topic": telemetry_topic,
            "value_template": template,
            "state_class": "measurement",
            "availability_topic": status_topic,
            "availability_template": "{{ value_json.state }}",
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": device,
        }
        if unit:
            config["unit_of_measurement"] = unit
        if device_class:
            config["device_class"] = device_class
        configs[f"{prefix}/sensor/{node}/{object_id}/config"] = config
    return configs
