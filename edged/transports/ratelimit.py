"""Requests per minute per client, for the listeners that take requests from the network: the TCP
listener's key gate (per key, or per address for anonymous clients) and MQTT (per requester)."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict

from edged.transports.limits import address_key


class RateLimiter:
    """A token bucket per client: ``per_min`` requests a minute, bursts up to the same number.

    At most `MAX_CLIENTS` buckets, least recently used first out: a flood of new names costs the same
    per call as one client and forgets only the buckets of clients idle the longest (a forgotten
    client starts again with a full bucket, as after a minute's rest)."""

    MAX_CLIENTS = 10_000
    """Buckets kept at most."""

    def __init__(self, per_min: int) -> None:
        self.per_min = per_min
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.refused = 0

    def take(self, who: str) -> float:
        """0 when allowed, else the seconds until a request would be."""
        if self.per_min <= 0:
            return 0.0
        rate = self.per_min / 60.0
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.pop(who, (float(self.per_min), now))
            tokens = min(float(self.per_min), tokens + (now - at) * rate)
            allowed = tokens >= 1.0
            self._buckets[who] = (tokens - 1.0 if allowed else tokens, now)  # now the most recent
            if len(self._buckets) > self.MAX_CLIENTS:
                self._buckets.popitem(last=False)
            if allowed:
                return 0.0
            self.refused += 1
            return (1.0 - tokens) / rate


def client_key(address: str) -> str:
    """Who an anonymous client is for its rate limit: its IPv4 address, or the /64 of an IPv6 one
    (one host commonly holds a whole /64, so its addresses are not separate clients)."""
    key = address_key(address)
    try:
        ip = ipaddress.ip_address(key)
    except ValueError:
        return key
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return key
