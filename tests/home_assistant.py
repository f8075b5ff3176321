"""A request shaped like Home Assistant's Ollama integration sends for Assist (issue 23), built the way
Home Assistant builds it, so a test can send what a house would send.

Where each part comes from (home-assistant/core, 2025-2026):

- ``homeassistant/components/ollama/entity.py``: ``client.chat(model, messages, tools, stream=True,
  keep_alive, options={"num_ctx": ...}, think, format)``; tools as ``{"type": "function", "function":
  {"name", "parameters", "description"}}``; an assistant turn's calls as ``tool_calls[].function`` with
  ``arguments`` an object; a tool result as ``role: "tool"`` whose content is the JSON of ``{"data",
  "error"}``; the history cut to ``max_history`` rounds (default 20) by the integration itself.
- ``homeassistant/helpers/llm.py``: the system prompt is the date/time line, the default instructions,
  then the Assist API prompt: ``DEVICE_CONTROL_TOOL_USAGE_PROMPT``, the area prompt, the no-timer
  line, ``DYNAMIC_CONTEXT_PROMPT`` and "Static Context: ..." followed by the YAML of the exposed
  entities (``names``, ``domain``, ``areas``; ``yaml_util.dump``, keys in insertion order). The tools
  are the intents' slot schemas as ``voluptuous_openapi`` converts them, plus ``GetDateTime``,
  ``todo_get_items`` and ``GetLiveContext``.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

DATE_TIME = "Current time is 18:21:07. Today's date is 2026-12-07.\n"
DEFAULT_INSTRUCTIONS = (
    "You are a voice assistant for Home Assistant.\n"
    "Answer questions about the world truthfully.\n"
    "Answer in plain text. Keep it simple and to the point.\n"
)
DEVICE_CONTROL = (
    "When controlling Home Assistant always call the intent tools. "
    "Use HassTurnOn to lock and HassTurnOff to unlock a lock. "
    "When controlling a device, prefer passing just name and domain. "
    "When controlling an area, prefer passing just area name and domain."
)
AREA = (
    "When a request names a generic device without an area, "
    "ask the user to specify which area they mean before targeting."
)
NO_TIMERS = "This device is not able to start timers."
DYNAMIC_CONTEXT = (
    "You ARE equipped to answer questions about the current state of\n"
    "the home using the `GetLiveContext` tool. This is a primary function. Do not state you lack the\n"
    "functionality if the question requires live data.\n"
    'If the user asks about device existence/type (e.g., "Do I have lights in the bedroom?"): Answer\n'
    "from the static context below.\n"
    'If the user asks about the CURRENT state, value, or mode (e.g., "Is the lock locked?",\n'
    '"Is the fan on?", "What mode is the thermostat in?", "What is the temperature outside?"):\n'
    "    1.  Recognize this requires live data.\n"
    "    2.  You MUST call `GetLiveContext`. This tool will provide the needed real-time information "
    "(like temperature from the local weather, lock status, etc.).\n"
    "    3.  Use the tool's response** to answer the user accurately "
    '(e.g., "The temperature outside is [value from tool].").\n'
    "For general knowledge questions not about the home: Answer truthfully from internal knowledge.\n"
)

ENTITIES: list[dict[str, str]] = [
    {"names": name, "domain": domain, "areas": area}
    for name, domain, area in (
        ("Kitchen Light", "light", "Kitchen"),
        ("Kitchen Counter Light", "light", "Kitchen"),
        ("Dishwasher Plug", "switch", "Kitchen"),
        ("Coffee Machine", "switch", "Kitchen"),
        ("Kitchen Temperature", "sensor", "Kitchen"),
        ("Living Room Light", "light", "Living Room"),
        ("Living Room Lamp, Reading Lamp", "light", "Living Room"),
        ("Living Room TV", "media_player", "Living Room"),
        ("Living Room Speaker", "media_player", "Living Room"),
        ("Living Room Blinds", "cover", "Living Room"),
        ("Living Room Thermostat", "climate", "Living Room"),
        ("Ceiling Fan", "fan", "Living Room"),
        ("Bedroom Light", "light", "Bedroom"),
        ("Bedside Lamp", "light", "Bedroom"),
        ("Bedroom Blinds", "cover", "Bedroom"),
        ("Bedroom Humidity", "sensor", "Bedroom"),
        ("Bedroom Fan", "fan", "Bedroom"),
        ("Bathroom Light", "light", "Bathroom"),
        ("Towel Heater", "switch", "Bathroom"),
        ("Hallway Light", "light", "Hallway"),
        ("Front Door", "lock", "Hallway"),
        ("Front Door Sensor", "binary_sensor", "Hallway"),
        ("Office Light", "light", "Office"),
        ("Office Heater", "climate", "Office"),
        ("Office Printer", "switch", "Office"),
        ("Garage Door", "cover", "Garage"),
        ("Garage Light", "light", "Garage"),
        ("Garden Lights", "light", "Garden"),
        ("Sprinkler", "switch", "Garden"),
        ("Outdoor Temperature", "sensor", "Garden"),
    )
]
"""30 exposed entities (``include_state=False``: the static context names and places them)."""
ENTITIES.append({"names": "Shopping List", "domain": "todo"})

DOMAINS = sorted({e["domain"] for e in ENTITIES})
_TARGET = {"name": {"type": "string"}, "area": {"type": "string"}, "floor": {"type": "string"}}
_DEVICE_CLASSES = [
    "identify",
    "restart",
    "update",
    "awning",
    "blind",
    "curtain",
    "damper",
    "door",
    "garage",
    "gate",
    "shade",
    "shutter",
    "window",
    "water",
    "gas",
    "outlet",
    "switch",
    "tv",
    "speaker",
    "receiver",
]


def _intent(
    name: str,
    description: str,
    extra: dict[str, Any] | None = None,
    required: list[str] | None = None,
    domain: bool = True,
    device_class: bool = False,
) -> dict[str, Any]:
    properties: dict[str, Any] = dict(_TARGET)
    if domain:
        properties["domain"] = {"type": "array", "items": {"type": "string"}}
    if device_class:
        properties["device_class"] = {"type": "array", "items": {"type": "string", "enum": _DEVICE_CLASSES}}
    properties.update(extra or {})
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return {
        "type": "function",
        "function": {"name": name, "parameters": parameters, "description": description},
    }


def _percent(description: str) -> dict[str, Any]:
    return {"type": "integer", "minimum": 0, "maximum": 100, "description": description}


TOOLS: list[dict[str, Any]] = [
    _intent(
        "HassTurnOn",
        "Turns on/opens/presses a device or entity. For locks, this performs a 'lock' action. Use for "
        "requests like 'turn on', 'activate', 'enable', or 'lock'.",
        device_class=True,
    ),
    _intent(
        "HassTurnOff",
        "Turns off/closes a device or entity. For locks, this performs an 'unlock' action. Use for "
        "requests like 'turn off', 'deactivate', 'disable', or 'unlock'.",
        device_class=True,
    ),
    _intent(
        "HassSetPosition",
        "Sets the position of a device or entity",
        {"position": _percent("The position percentage")},
        ["position"],
        device_class=True,
    ),
    _intent(
        "HassLightSet",
        "Sets the brightness percentage or color of a light",
        {
            "color": {"type": "string"},
            "temperature": {"type": "integer", "minimum": 0},
            "brightness": _percent(
                "The brightness percentage of the light between 0 and 100, "
                "where 0 is off and 100 is fully lit"
            ),
        },
    ),
    _intent(
        "HassClimateSetTemperature",
        "Sets the target temperature of a climate device or entity",
        {"temperature": {"type": "number"}},
        ["temperature"],
        domain=False,
    ),
    _intent("HassMediaPause", "Pauses a media player", device_class=True),
    _intent("HassMediaUnpause", "Resumes a media player", device_class=True),
    _intent("HassMediaNext", "Skips a media player to the next item", device_class=True),
    _intent("HassMediaPrevious", "Replays the previous item for a media player", device_class=True),
    _intent(
        "HassSetVolume",
        "Sets the volume percentage of a media player",
        {"volume_level": _percent("The volume percentage of the media player")},
        ["volume_level"],
        device_class=True,
    ),
    _intent(
        "HassFanSetSpeed",
        "Sets a fan's speed by percentage",
        {"percentage": _percent("The speed percentage of the fan")},
        ["percentage"],
    ),
    _intent(
        "HassListAddItem",
        "Add item to a todo list",
        {"item": {"type": "string"}, "name": {"type": "string"}},
        ["item", "name"],
        domain=False,
    ),
    _intent(
        "HassListCompleteItem",
        "Complete item on a todo list",
        {"item": {"type": "string"}, "name": {"type": "string"}},
        ["item", "name"],
        domain=False,
    ),
    {
        "type": "function",
        "function": {
            "name": "GetDateTime",
            "parameters": {"type": "object", "properties": {}},
            "description": "Provides the current date and time.",
        },
    },
    {
        "type": "function",
        "function": {
            "name": "todo_get_items",
            "parameters": {
                "type": "object",
                "properties": {
                    "todo_list": {"type": "string", "enum": ["Shopping List"]},
                    "status": {
                        "type": "string",
                        "enum": ["needs_action", "completed", "all"],
                        "description": "Filter returned items by status, by default returns incomplete items",
                        "default": "needs_action",
                    },
                },
                "required": ["todo_list"],
            },
            "description": (
                "Query a to-do list to find out what items are on it. Use this to answer questions like "
                "'What's on my task list?' or 'Read my grocery list'. Filters items by status "
                "(needs_action, completed, all)."
            ),
        },
    },
    {
        "type": "function",
        "function": {
            "name": "GetLiveContext",
            "parameters": {"type": "object", "properties": {}},
            "description": (
                "Provides real-time information about the CURRENT state, value, or mode of devices, "
                "sensors, entities, or areas. Use this tool for: 1. Answering questions about current "
                'conditions (e.g., "Is the light on?"). 2. As the first step in conditional actions (e.g., '
                '"If the weather is rainy, turn off sprinklers" requires checking the weather first).'
            ),
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def system_prompt() -> str:
    """The system message Assist sends: date and instructions, then the Assist API's prompt."""
    static = yaml.dump(ENTITIES, default_flow_style=False, allow_unicode=True, sort_keys=False)
    api_prompt = "\n".join(
        [
            DEVICE_CONTROL,
            AREA,
            NO_TIMERS,
            DYNAMIC_CONTEXT,
            "Static Context: An overview of the areas and the devices in this smart home:",
            static,
        ]
    )
    return "\n".join([DATE_TIME + DEFAULT_INSTRUCTIONS, api_prompt])


def _result(data: dict[str, Any]) -> dict[str, Any]:
    return {"role": "tool", "content": json.dumps({"data": data, "error": None})}


def _done(names: list[str]) -> dict[str, Any]:
    return {
        "speech": {},
        "response_type": "action_done",
        "data": {
            "targets": [],
            "success": [{"name": n, "type": "entity", "id": n} for n in names],
            "failed": [],
        },
    }


_ACTIONS = [
    ("Turn off the hallway light.", "HassTurnOff", {"name": "Hallway Light"}, "The hallway light is off."),
    (
        "Open the bedroom blinds halfway.",
        "HassSetPosition",
        {"name": "Bedroom Blinds", "position": 50},
        "The bedroom blinds are at 50%.",
    ),
    (
        "Dim the living room lamp to 30 percent.",
        "HassLightSet",
        {"name": "Reading Lamp", "brightness": 30},
        "The reading lamp is at 30%.",
    ),
    (
        "Set the office heater to 21 degrees.",
        "HassClimateSetTemperature",
        {"name": "Office Heater", "temperature": 21},
        "The office heater is set to 21 degrees.",
    ),
    (
        "Add milk to the shopping list.",
        "HassListAddItem",
        {"item": "milk", "name": "Shopping List"},
        "Milk is on your shopping list.",
    ),
    (
        "Lock the front door.",
        "HassTurnOn",
        {"name": "Front Door", "domain": ["lock"]},
        "The front door is locked.",
    ),
    ("Pause the TV.", "HassMediaPause", {"name": "Living Room TV"}, "The TV is paused."),
    (
        "Turn the speaker volume to 25.",
        "HassSetVolume",
        {"name": "Living Room Speaker", "volume_level": 25},
        "The speaker volume is 25%.",
    ),
]
_QUESTIONS = [
    ("Do I have lights in the garden?", "Yes, the Garden Lights in the Garden."),
    ("What is the capital of Norway?", "Oslo."),
    ("Which rooms have blinds?", "The living room and the bedroom."),
    ("How many minutes are in a day?", "1440 minutes."),
]


def history(turns: int = 20) -> list[dict[str, Any]]:
    """``turns`` earlier rounds (Home Assistant's default ``max_history``), alternating actions (the
    user's words, the call, its result, the spoken answer) and questions answered in text."""
    out: list[dict[str, Any]] = []
    for i in range(turns):
        if i % 3 == 2:
            question, answer = _QUESTIONS[i // 3 % len(_QUESTIONS)]
            out += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            continue
        words, tool, arguments, spoken = _ACTIONS[i % len(_ACTIONS)]
        call = {"function": {"name": tool, "arguments": arguments}}
        out += [
            {"role": "user", "content": words},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            _result(_done([str(arguments.get("name", tool))])),
            {"role": "assistant", "content": spoken},
        ]
    return out


def chat_request(question: str = "Turn on the kitchen light.", turns: int = 20) -> dict[str, Any]:
    """The body of the ``/api/chat`` request the integration sends (``num_ctx`` is its default, 8192:
    Home Assistant does not know edged's 2048 cap)."""
    return {
        "model": "edged",
        "messages": [
            {"role": "system", "content": system_prompt()},
            *history(turns),
            {"role": "user", "content": question},
        ],
        "tools": TOOLS,
        "stream": True,
        "keep_alive": -1,
        "options": {"num_ctx": 8192},
    }
