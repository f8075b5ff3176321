"""The token bucket the TCP key gate and MQTT rate-limit with, and who an anonymous client is."""

from __future__ import annotations

import pytest

from edged.transports.ratelimit import RateLimiter, client_key

from .conftest import Clock


def test_a_burst_of_per_min_then_one_request_per_refill(clock: Clock) -> None:
    limiter = RateLimiter(per_min=6)  # one token every 10 s
    assert [limiter.take("a") for _ in range(6)] == [0.0] * 6
    assert limiter.take("a") == pytest.approx(10.0)
    assert limiter.refused == 1
    clock.t += 9.0
    assert limiter.take("a") == pytest.approx(1.0), "a refused request does not cost a token"
    clock.t += 1.0
    assert limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(10.0)
    assert limiter.refused == 3


def test_clients_have_their_own_buckets_and_rest_refills_only_to_a_full_one(clock: Clock) -> None:
    limiter = RateLimiter(per_min=2)
    assert limiter.take("a") == limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    assert limiter.take("b") == 0.0, "another client is not held back by a"
    clock.t += 3600  # an hour of rest is worth a full bucket, not 120 requests
    assert [limiter.take("a") == 0.0 for _ in range(3)] == [True, True, False]


def test_zero_per_min_is_no_limit(clock: Clock) -> None:
    limiter = RateLimiter(per_min=0)
    assert all(limiter.take("a") == 0.0 for _ in range(1000))
    assert limiter.refused == 0


def test_an_address_that_is_no_ip_is_its_own_client() -> None:
    assert client_key("testclient") == "testclient"
    assert client_key("10.1.2.3") != client_key("10.1.2.4"), "IPv4 is per address, not per network"
