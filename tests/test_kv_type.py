"""The KV cache's number format (`llamacpp.kv_type`, issue 25): q8_0 and q4_0 for K and V with flash
attention, so a small board holds more slots. Real daemon, real model: each answers; `/status` shows
the type and the cache's size, in the ratio ggml's blocks give; a board whose memory refuses four f16
slots serves them in q4_0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import chat
from test_model_faults import small_memory_root

pytestmark = pytest.mark.system

BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def details_and_answer(d: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    with d.client() as c:
        details = c.get("/status").json()["backend"]["details"]
        r = c.post("/v1/chat/completions", json=chat("Name a colour.", max_tokens=12, temperature=0))
    assert r.status_code == 200, r.text
    return details, r.json()


def test_each_kv_type_answers_and_status_shows_its_size(start_daemon: Any) -> None:
    seen: dict[str, float] = {}
    for kv_type in ("f16", "q8_0", "q4_0"):
        d = start_daemon(EDGED_LLAMACPP__KV_TYPE=kv_type, EDGED_ENGINE__PARALLEL="2")
        details, answer = details_and_answer(d)
        assert details["kv_type"] == kv_type
        assert answer["choices"][0]["message"]["content"].strip(), answer
        seen[kv_type] = details["kv_mb"]
        d.stop()
    for kv_type in ("q8_0", "q4_0"):  # the same cells, fewer bytes each
        expected = BYTES_PER_VALUE[kv_type] / BYTES_PER_VALUE["f16"]
        assert abs(seen[kv_type] / seen["f16"] - expected) < 0.02, seen


def test_a_board_too_small_for_f16_slots_serves_them_in_q4_0(start_daemon: Any, tmp_path: Path) -> None:
    """200 MB available: the 98 MB model and four 2048-token f16 streams (189 MB) are refused
    (tests/test_model_faults.py); in q4_0 the same four streams take 53 MB."""
    root = small_memory_root(tmp_path)
    d = start_daemon(EDGED_BOARD__ROOT=str(root), EDGED_LLAMACPP__KV_TYPE="q4_0", EDGED_ENGINE__PARALLEL="4")
    details, _ = details_and_answer(d)
    assert details["kv_type"] == "q4_0" and details["slots"] == 4 and details["kv_mb"] < 60, details
