"""MQTT transport: IoT devices publish prompts, edged publishes answers (paho-mqtt 2.x).

It translates between MQTT messages and the engine's `JobRequest` / job events, and keeps the
promise "accepted means answered": jobs arrive at QoS 1 on a persistent session; each is written to
the job journal (state ``accepted``) before its PUBACK; its answer is recorded (``done``/``failed``)
before it is published, and marked ``answered`` when the answer's own PUBACK comes back. At start,
before any new delivery is taken, jobs the journal holds as accepted or running run again and
answers never acknowledged are published again. A redelivery is recognised by its idempotency key
and answered from the journal, never generated twice. MQTT v5 Receive Maximum keeps the broker from
pushing more unacknowledged jobs than the queue can hold; a journal that cannot be written leaves
messages unacknowledged (the broker keeps them) and is retried until it can.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from paho.mqtt import client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError

from edged.engine import Delta, Engine, EngineState, Failed, Finished, Job, JobRequest
from edged.engine.answer import done_message, error_message
from edged.engine.constraints import constraint_of
from edged.errors import (
    BackendError,
    EdgedError,
    InvalidRequest,
    NotReady,
    PayloadTooLarge,
    QueueFull,
    RateLimited,
    ShuttingDown,
    TransportError,
)
from edged.journal import AcceptResult, InvalidTransition, JobRecord, JournalEntry, JournalUnavailable
from edged.journal.intake import JobIntake, Recovery, Ticket
from edged.mqtt.broker import BrokerOptions, BrokerSetupError
from edged.mqtt.client import make_client
from edged.mqtt.client import start as start_client
from edged.tools.grammar import build_grammar
from edged.transports.ratelimit import RateLimiter
from edged.wire import ChunkMessage

if TYPE_CHECKING:
    from edged.config import MqttConfig, Settings

log = structlog.get_logger(__name__)

QOS = 1
MAX_TOPIC_BYTES = 1024
"""The longest reply topic taken (MQTT allows 65535; no sane requester needs more than this)."""
PACKET_HEADROOM = 64 * 1024
"""Maximum Packet Size = ``jobs.max_payload_bytes`` + this, for the topic and v5 properties: the
broker does not deliver a bigger message at all, so it never reaches memory here."""
STORAGE_RETRY_S = (0.5, 1.0, 2.0, 5.0, 10.0)
"""Back-off while the journal cannot be written; the message stays unacknowledged meanwhile."""


@dataclass(frozen=True)
class Topics:
    """Every topic edged uses, derived from the prefix, the device id and the share group."""

    jobs: str
    fleet: str
    fleet_subscription: str
    cancel: str
    status: str
    errors: str
    results: str
    telemetry: str
    prefix: str = "edged"

    @property
    def user_jobs(self) -> str:
        """``<jobs>/+``: a requester's own jobs topic, ``<jobs>/<user>`` (ACL: ``%u``)."""
        return f"{self.jobs}/+"

    @property
    def fleet_user_subscription(self) -> str:
        return f"{self.fleet_subscription}/+"

    def user_of(self, topic: str) -> str | None:
        """The user a job topic names (``<jobs>/<user>``, ``<fleet>/<user>``), else None."""
        for base in (self.jobs, self.fleet):
            if topic.startswith(base + "/"):
                user = topic[len(base) + 1 :]
                return user if user and "/" not in user else None
        return None

    def is_job_topic(self, topic: str) -> bool:
        return topic in (self.jobs, self.fleet) or self.user_of(topic) is not None

    @classmethod
    def build(cls, prefix: str, device_id: str, group: str) -> Topics:
        base = f"{prefix}/{device_id}"
        return cls(
            jobs=f"{base}/jobs",
            fleet=f"{prefix}/fleet/jobs",
            fleet_subscription=f"$share/{group}/{prefix}/fleet/jobs",
            cancel=f"{base}/cancel",
            status=f"{base}/status",
            errors=f"{base}/errors",
            results=f"{base}/results",
            telemetry=f"{base}/telemetry",
            prefix=prefix,
        )


@dataclass(frozen=True)
class Reply:
    """Where an answer goes, and the v5 correlation data to echo."""

    topic: str
    correlation: bytes | None = None


def _id_hint(payload: bytes) -> str | None:
    """The id of a refused job, echoed in its error when the payload has one that can be published
    (a payload too deep for the parser, or an id with a lone surrogate, gets an error without it)."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    job_id = data.get("id") if isinstance(data, dict) else None
    if not isinstance(job_id, str):
        return None
    try:
        job_id.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return job_id


def parse_job(payload: bytes, limit: int) -> tuple[JobRequest, str | None]:
    """A payload as a job: JSON with the job schema (plus ``reply_to``), or a bare UTF-8 prompt."""
    if len(payload) > limit:
        raise PayloadTooLarge(f"payload of {len(payload)} bytes exceeds the limit of {limit} bytes")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"payload is not valid UTF-8 (byte {exc.start})") from exc
    if not text.strip():
        raise InvalidRequest("empty payload: send a prompt or a job as JSON")
    if not text.lstrip().startswith(("{", "[", '"')):
        return JobRequest(prompt=text), None
    try:
        data = json.loads(text)
        # a string with a lone surrogate (\ud800) is no text: it cannot be tokenized or published
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError, UnicodeEncodeError) as exc:  # also too deep, too many digits
        raise InvalidRequest(f"malformed JSON: {exc}") from exc
    if isinstance(data, str):
        return JobRequest(prompt=data), None
    if not isinstance(data, dict):
        raise InvalidRequest("a job must be a JSON object or a plain-text prompt")
    reply_to = data.pop("reply_to", None)
    if reply_to is not None:
        check_reply_topic(reply_to, "reply_to")
    try:
        return JobRequest.model_validate(data), reply_to
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'job'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidRequest(f"invalid job: {problems}") from exc


def check_reply_topic(topic: object, param: str, reserved: tuple[str, ...] = ()) -> str:
    """``topic`` if answers may be published there, else `InvalidRequest` naming ``param``.

    A topic the broker takes: it disconnects a client that publishes control characters or
    non-characters (the answer, kept for the retry, would do it again after every reconnect), paho
    refuses wildcards, and a $ topic is the broker's own, where no client would see the answer.
    ``reserved``: topic prefixes that are not a requester's to be answered on (edged's own
    ``<prefix>/`` — another job's results, the status, the jobs topic — and Home Assistant's
    discovery prefix): edged must not be steered into publishing there for someone.
    """
    if (
        not isinstance(topic, str)
        or not topic
        or topic.startswith("$")
        or "+" in topic
        or "#" in topic
        or len(topic.encode("utf-8", errors="replace")) > MAX_TOPIC_BYTES
        or any(
            ord(c) < 0x20
            or 0x7F <= ord(c) <= 0x9F
            or 0xD800 <= ord(c) <= 0xDFFF
            or 0xFDD0 <= ord(c) <= 0xFDEF
            or ord(c) & 0xFFFE == 0xFFFE
            for c in topic
        )
    ):
        raise InvalidRequest(
            f"{param} must be a topic name of at most {MAX_TOPIC_BYTES} bytes: no wildcards (+ #), "
            "control characters or leading $",
            param=param,
        )
    for prefix in reserved:
        if topic == prefix or topic.startswith(prefix + "/"):
            raise InvalidRequest(
                f"{param} {topic!r} is inside {prefix}/, which is edged's or Home Assistant's own: "
                "answer topics are the requester's (e.g. replies/<client>/...)",
                param=param,
            )
    return topic


def _client_of(message: paho.MQTTMessage, reply_to: str | None, topics: Topics) -> str:
    """Who sent a job, for the rate limit. A job published on ``<jobs topic>/<user>`` is that user's
    (the broker's ACL binds the last level to the authenticated user: ``%u``), whatever the message
    claims. Otherwise MQTT does not tell a subscriber the publisher's client id, so a v5 user
    property ``client_id`` names it, else its response topic or ``reply_to``: claims, in their own
    namespace, so a claim cannot reach an authenticated user's bucket."""
    user = topics.user_of(message.topic)
    if user is not None:
        return f"user:{user}"
    props = getattr(message, "properties", None)
    for name, value in getattr(props, "UserProperty", None) or []:
        if name == "client_id" and value:
            return f"client:{value}"
    topic = getattr(props, "ResponseTopic", None) if props is not None else None
    if topic or reply_to:
        return f"topic:{topic or reply_to}"
    return "anonymous"


def derived_job_id(key: str) -> str:
    """A job without a client id is named after its idempotency key, so a redelivery of the same
    message (after a crash) gets the same id and the same results topic."""
    return "job-" + key.split(":", 1)[1][:16]


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()


class MqttTransport:
    """Connects to the broker, turns messages into jobs and job events into messages."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        presence: Callable[[], dict[str, Any]],
        discovery: dict[str, dict[str, Any]] | None = None,
        intake: JobIntake | None = None,
    ) -> None:
        self.engine = engine
        self.intake = intake
        """The job journal; None with ``journal.enabled = false`` (jobs then live only in memory)."""
        self.settings = settings
        self.config: MqttConfig = settings.mqtt
        self.device_id = settings.device_id
        self.topics = Topics.build(self.config.topic_prefix, self.device_id, self.config.share_group)
        self.presence = presence
        """Builds the retained status document from the engine's snapshot (current backend and model)."""
        self.discovery = discovery or {}
        self.connected = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._submit_lock = asyncio.Lock()
        self._v5 = self.config.protocol == "5"
        self._closing = False
        # Answers handed to paho, by message id, until their PUBACK: the journal key to mark answered
        # (None for messages that need no mark). paho may report the PUBACK before publish() returns
        # to us, hence `_acked_early`. Never call paho while holding `_acks_lock` (paho calls
        # on_publish with its own lock held).
        self._acks_lock = threading.Lock()
        self._awaiting: dict[int, str | None] = {}
        self._acked_early: set[int] = set()
        self._unacked_answers = 0
        self._relays: dict[asyncio.Task[None], Job] = {}
        self.counters = {
            "duplicates": 0,
            "recovered": 0,
            "republished": 0,
            "storage_waits": 0,
            "rate_limited": 0,
        }
        self._limiter = RateLimiter(self.config.rate_per_min)
        self._reserved = (self.config.topic_prefix, settings.telemetry.discovery_prefix)
        """Topic prefixes no reply may point into."""
        self._client = self._make_client()

    # -- connection -----------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        """The shared client factory (`edged.mqtt`): the same broker address forms (IPv6 in
        brackets), credentials and TLS as `edged ask --mqtt` and `edged fleet`."""
        try:
            self.broker = BrokerOptions.from_config(self.config)
            client = make_client(self.broker, f"edged-{self.device_id}", persistent=True, manual_ack=True)
        except (BrokerSetupError, OSError, ssl.SSLError) as exc:
            raise TransportError(f"cannot set up the MQTT client: {exc}") from exc
        client.will_set(
            self.topics.status, _encode({**self.presence(), "state": "offline"}), qos=QOS, retain=True
        )
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _connect_properties(self) -> Properties | None:
        if not self._v5:
            return None
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry_s
        # As many unacknowledged jobs as edged can hold: every slot plus the queue.
        props.ReceiveMaximum = max(1, min(65535, self.engine.receive_maximum))
        # The broker drops what exceeds it instead of pushing it into our memory (MQTT v5 3.1.2.11.4).
        props.MaximumPacketSize = min(268_435_455, self.settings.jobs.max_payload_bytes + PACKET_HEADROOM)
        return props

    async def start(self, recovery: Recovery | None = None) -> None:
        """Recover first, then connect: ``recovery`` (what this start's `JobIntake.recover` left to
        MQTT) is queued before any new delivery (the submit lock is taken here, before the
        connection, and released when recovery has handed every held job to the engine)."""
        if self.intake is not None and recovery is not None:
            await self._submit_lock.acquire()
            self._spawn_task(self._recover(recovery))
        self._connect()

    def _connect(self) -> None:
        log.info(
            "mqtt connecting",
            broker=self.broker.address,
            protocol=self.broker.protocol,
            tls=self.broker.tls_active,
            client_id=f"edged-{self.device_id}",
        )
        start_client(self._client, self.broker, properties=self._connect_properties(), persistent=True)

    def pause_intake(self) -> None:
        """Take no new job: later deliveries are left unacknowledged, so the broker keeps them for
        the next start (a job already journaled is acknowledged and runs at the next start)."""
        self._closing = True

    async def stop(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for the PUBACKs of answers already sent, publish ``offline`` ourselves (the
        will is only for crashes), then disconnect. An answer not acknowledged by then stays ``done``
        in the journal and is published again at the next start."""
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        finished = [task for task, job in self._relays.items() if job.finished]
        if finished:  # answers of jobs that finished while draining: recorded and handed to paho
            await asyncio.wait(finished, timeout=timeout)
        while self._unacked_answers and self._client.is_connected() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self._client.is_connected():
            info = self._send(
                self.topics.status, {**self.presence(), "state": "offline"}, qos=QOS, retain=True
            )
            if info is not None:
                await asyncio.to_thread(info.wait_for_publish, max(0.1, deadline - loop.time()))
        for task in list(self._tasks):
            task.cancel()
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        log.info("mqtt stopped")

    def _on_connect(
        self, client: paho.Client, _userdata: Any, flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            log.error(
                "mqtt broker refused the connection; retrying",
                reason=str(reason),
                hint="check mqtt.username / mqtt.password and the broker's ACL"
                if "authori" in str(reason).lower() or "password" in str(reason).lower()
                else None,
            )
            return
        subscriptions = [(self.topics.jobs, QOS), (self.topics.user_jobs, QOS), (self.topics.cancel, QOS)]
        if self.config.fleet:
            subscriptions.append((self.topics.fleet_subscription, QOS))
            subscriptions.append((self.topics.fleet_user_subscription, QOS))
        client.subscribe(subscriptions)
        self.publish_presence(client)
        for topic, config in self.discovery.items():
            self._send(topic, config, qos=QOS, retain=True)
        log.info(
            "mqtt connected",
            session_present=getattr(flags, "session_present", None),
            topics=[t for t, _ in subscriptions],
        )
        self._loop.call_soon_threadsafe(self.connected.set)

    def publish_presence(self, client: paho.Client | None = None) -> None:
        """Retain ``online`` with the current backend and model, and make the will say the same
        (a backend switch after a failure changes both)."""
        client = client or self._client
        presence = self.presence()
        client.will_set(self.topics.status, _encode({**presence, "state": "offline"}), qos=QOS, retain=True)
        self._send(self.topics.status, {**presence, "state": "online"}, qos=QOS, retain=True)

    def _on_connect_fail(self, _client: paho.Client, _userdata: Any) -> None:
        log.error(
            "mqtt connection failed; retrying",
            broker=self.broker.address,
            tls=self.broker.tls_active,
            hint="check mqtt.tls.ca against the broker's certificate"
            if self.broker.tls_active
            else "is the broker running and reachable?",
        )

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        self._loop.call_soon_threadsafe(self.connected.clear)
        log.warning("mqtt disconnected; answers wait in the outbox until reconnect", reason=str(reason))

    def _on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        self._loop.call_soon_threadsafe(self._spawn, message)

    def _spawn(self, message: paho.MQTTMessage) -> None:
        self._spawn_task(self._handle(message))

    def _spawn_task(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- inbound --------------------------------------------------------------------------------

    def _reply_of(self, message: paho.MQTTMessage) -> Reply | None:
        """The v5 Response Topic and Correlation Data; `InvalidRequest` for a topic answers may not
        go to (checked as ``reply_to`` is)."""
        props = getattr(message, "properties", None)
        topic = getattr(props, "ResponseTopic", None) if props is not None else None
        if not topic:
            return None
        check_reply_topic(topic, "Response Topic", self._reserved)
        correlation = getattr(props, "CorrelationData", None)
        return Reply(topic, bytes(correlation) if correlation is not None else None)

    async def _handle(self, message: paho.MQTTMessage) -> None:
        """Every message is answered, acted on or left for the broker to deliver again; nothing
        here may raise."""
        ack = True
        try:
            if message.topic == self.topics.cancel:
                self._cancel(message)
            else:
                ack = await self._take_job(message)
        except asyncio.CancelledError:
            # Shutting down before the job was journaled: no ack, so the broker delivers it again.
            raise
        except Exception:  # a bug here must not lose the broker's message silently
            log.exception("mqtt message handling failed", topic=message.topic)
        if ack:
            self._client.ack(message.mid, message.qos)

    def _cancel(self, message: paho.MQTTMessage) -> None:
        """``{"id"}`` cancels that job of the requester whose answers go to the same topic: the
        cancel's v5 Response Topic, else its ``reply_to``, else the job's default results topic.
        Another requester's job is `NotFound`, as an unknown one."""
        payload = bytes(message.payload)
        try:
            data = json.loads(payload)
            job_id = data.get("id") if isinstance(data, dict) else None
            if not isinstance(job_id, str):
                raise InvalidRequest('a cancel message is {"id": "<job id>"}')
            reply_to = data.get("reply_to")
            if reply_to is not None:
                check_reply_topic(reply_to, "reply_to", self._reserved)
            reply = self._reply_for(self._reply_of(message), reply_to, job_id)
            job = self.engine.cancel(job_id, "cancelled over MQTT", owner=self._owner(reply))
            log.info("mqtt cancel", job_id=job_id, state=job.state.value)
        except (ValueError, UnicodeDecodeError, RecursionError):
            self._publish(
                Reply(self.topics.errors),
                error_message(None, InvalidRequest("cancel payload is not JSON"), self.device_id),
            )
        except EdgedError as exc:
            self._publish(Reply(self.topics.errors), error_message(None, exc, self.device_id))

    def _reply_for(self, reply: Reply | None, reply_to: str | None, job_id: str) -> Reply:
        """The v5 response topic, else the payload's ``reply_to``, else ``<prefix>/<id>/results/<job>``."""
        if reply is not None:
            return reply
        return Reply(reply_to or f"{self.topics.results}/{job_id}")

    @staticmethod
    def _owner(reply: Reply) -> str:
        """Who an MQTT job belongs to: the topic its answers go to (who can read them)."""
        return f"mqtt:{reply.topic}"

    def _constraint_problem(self, request: JobRequest) -> EdgedError | None:
        """A job's JSON schema or grammar checked (bounded, and converted once) before it is
        journaled: one that cannot be run is answered now and never stored as runnable. A tool job's
        tool schemas too (converted as the generic form's grammar, which converts every tool the
        choice allows: the same conversion whatever form the model writes)."""
        if request.response_format is None and request.grammar is None and not request.uses_tools:
            return None
        try:
            if request.uses_tools:
                build_grammar("generic", request.tool_specs, request.choice, parallel=request.parallel)
            constraint_of(request.response_format, request.grammar, after_think=False)
        except EdgedError as exc:
            return exc
        except RecursionError:
            return InvalidRequest("the job's schema is nested too deeply", param="response_format")
        except Exception as exc:
            log.exception("checking a job's constraint failed")
            return InvalidRequest(f"the job's schema or grammar cannot be used: {type(exc).__name__}")
        return None

    async def _take_job(self, message: paho.MQTTMessage) -> bool:
        """Journal, queue and relay one job; returns whether to acknowledge the message."""
        if self._closing:
            return False
        payload = bytes(message.payload)
        try:
            reply = self._reply_of(message)
        except InvalidRequest as exc:  # nowhere safe to answer but our own errors topic
            self._publish(Reply(self.topics.errors), error_message(_id_hint(payload), exc, self.device_id))
            return True
        try:
            request, reply_to = parse_job(payload, self.settings.jobs.max_payload_bytes)
            if reply_to is not None:
                check_reply_topic(reply_to, "reply_to", self._reserved)
        except EdgedError as exc:
            hint = None if isinstance(exc, PayloadTooLarge) else _id_hint(payload)
            self._publish(reply or Reply(self.topics.errors), error_message(hint, exc, self.device_id))
            return True
        # The requester's reply topic is part of who owns a client's id (the key); a job without an
        # id is named after its payload's key, and answered on that name's results topic.
        owner = self._reply_for(reply, reply_to, request.id).topic if request.id else ""
        entry = JournalEntry(
            origin="mqtt",
            payload=payload,
            job_id=request.id,
            response_topic=reply.topic if reply else None,
            correlation=reply.correlation if reply else None,
            qos=message.qos,
            owner=owner,
        )
        job_id = request.id or derived_job_id(entry.key)
        request = request.model_copy(update={"id": job_id})
        who = _client_of(message, reply_to, self.topics)
        reply = self._reply_for(reply, reply_to, job_id)
        problem = await asyncio.to_thread(self._constraint_problem, request)
        if problem is not None:
            log.info(
                "mqtt job refused before journaling", job_id=job_id, code=problem.code, error=problem.message
            )
            self._publish(reply, error_message(job_id, problem, self.device_id))
            return True
        wait = self._limiter.take(who)
        if wait > 0:
            self.counters["rate_limited"] += 1
            retry = max(1, math.ceil(wait))
            limit = self.config.rate_per_min
            error = RateLimited(
                f"client {who!r} is over mqtt.rate_per_min ({limit}); retry in {retry} s", retry_after=retry
            )
            log.warning("mqtt job rate limited", client=who, job_id=job_id)
            self._publish(reply, error_message(job_id, error, self.device_id))
            return True

        if self.intake is None:
            known = self.engine.recent(job_id, self._owner(reply))
            if known is not None:
                self._answer_known(known, reply)
                return True
        async with self._submit_lock:  # one at a time, in arrival order, so room is not raced for
            await self.engine.wait_for_room()
            ticket = None
            if self.intake is not None:
                accepted = await self._journal(self.intake, entry)
                if accepted is None:
                    return False  # shutting down while the journal could not be written: not taken
                if not accepted.new:
                    self._answer_duplicate(accepted.record, reply)
                    return True
                ticket = Ticket.of(accepted.record)
            await self._submit(request, reply, ticket)
        return True

    async def _journal(self, intake: JobIntake, entry: JournalEntry) -> AcceptResult | None:
        """Commit the entry, retrying while the journal cannot be written (disk full, read-only):
        the message stays unacknowledged meanwhile, so nothing is lost if edged dies waiting."""
        attempt = 0
        while True:
            try:
                return await intake.accept(entry)
            except JournalUnavailable as exc:
                if self._closing:
                    return None
                delay = STORAGE_RETRY_S[min(attempt, len(STORAGE_RETRY_S) - 1)]
                if attempt == 0:
                    self.counters["storage_waits"] += 1
                    log.error(
                        "job journal cannot be written: new MQTT jobs wait unacknowledged at the broker",
                        error=exc.message,
                        retry_in_s=delay,
                    )
                    self._publish(Reply(self.topics.errors), error_message(entry.job_id, exc, self.device_id))
                attempt += 1
                await asyncio.sleep(delay)

    async def _submit(self, request: JobRequest, reply: Reply, ticket: Ticket | None) -> None:
        """Hand a (journaled) job to the engine and relay its events; a job refused for good is
        answered with its error. Called with the submit lock held."""
        key = ticket.key if ticket is not None else None
        while True:
            await self.engine.wait_for_room()
            try:
                job = await self.engine.submit(
                    request, origin="mqtt", ticket=ticket, owner=self._owner(reply), family="mqtt"
                )
                break
            except QueueFull:
                continue  # a socket client took the room meanwhile: wait again
            except NotReady:
                if key is not None and self.engine.state is EngineState.STOPPING:
                    return  # journaled: it runs at the next start
                raise
            except EdgedError as exc:
                await self._answer(key, reply, error_message(request.id, exc, self.device_id))
                return
            except Exception as exc:  # a bug must still answer (and close) an acknowledged job
                log.exception("submitting an MQTT job failed", job_id=request.id)
                failure = BackendError(f"edged could not take the job: {type(exc).__name__}")
                await self._answer(key, reply, error_message(request.id, failure, self.device_id))
                return
        task = self._loop.create_task(self._relay(job, reply, key))
        self._tasks.add(task)
        self._relays[task] = job
        task.add_done_callback(self._relay_done)

    def _relay_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._relays.pop(task, None)

    async def _recover(self, recovery: Recovery) -> None:
        """Publish again the answers never acknowledged (and those of jobs given up after
        ``journal.max_attempts``), run again the jobs never finished (the submit lock, taken in
        `start`, is held until every one is queued). Each row on its own: one that fails is
        answered with its error (or logged) and the others go on. Which rows those are, and what
        happens to the socket's, is the intake's (`edged.journal.intake`)."""
        counts = {"rerun": 0, "republished": 0, "given_up": 0, "errors": 0}
        try:
            for counter, records in (("republished", recovery.republish), ("given_up", recovery.given_up)):
                for record in records:
                    try:
                        message = record.answer or record.error or {}
                        _, reply = self._restore(record)
                        counts[counter] += 1
                        self.counters["republished" if counter == "republished" else "recovered"] += 1
                        self._publish(reply, message, key=record.key)
                    except Exception:
                        counts["errors"] += 1
                        log.exception("could not publish a journaled answer again", key=record.key)
            for record in recovery.rerun:
                try:
                    await self._recover_one(record, counts)
                except Exception:
                    counts["errors"] += 1
                    log.exception("could not recover a journaled job", key=record.key)
            if any(counts.values()):
                log.info("journal recovered", **counts)
        finally:
            self._submit_lock.release()

    async def _recover_one(self, record: JobRecord, counts: dict[str, int]) -> None:
        request, reply = self._restore(record)
        self.counters["recovered"] += 1
        if request is None:
            error = InvalidRequest("the journaled job can no longer be read")
            await self._answer(record.key, reply, error_message(record.job_id, error, self.device_id))
            return
        counts["rerun"] += 1
        await self._submit(request, reply, Ticket.of(record))

    def _restore(self, record: JobRecord) -> tuple[JobRequest | None, Reply]:
        """A journaled job as it was received: its request (None if it no longer parses) and reply."""
        job_id = record.job_id or derived_job_id(record.key)
        correlation = Reply(record.response_topic, record.correlation) if record.response_topic else None
        try:
            request, reply_to = parse_job(record.payload, max(len(record.payload), 1))
            if correlation is not None:
                check_reply_topic(correlation.topic, "Response Topic", self._reserved)
            if reply_to is not None:
                check_reply_topic(reply_to, "reply_to", self._reserved)
        except EdgedError:  # journaled by an older edged that let it through: answer on errors
            return None, Reply(self.topics.errors)
        return request.model_copy(update={"id": job_id}), self._reply_for(correlation, reply_to, job_id)

    # -- outbound -------------------------------------------------------------------------------

    def _answer_known(self, job: Job, reply: Reply) -> None:
        """Journal off: a duplicate delivery of a job this process still remembers."""
        self.counters["duplicates"] += 1
        if job.finished:
            log.info("mqtt duplicate job answered from the stored result", job_id=job.id)
            message = self._final(job)
            message["duplicate"] = True
            self._publish(reply, message)
        else:
            log.info("mqtt duplicate delivery of a job in progress ignored", job_id=job.id)

    def _answer_duplicate(self, record: JobRecord, reply: Reply) -> None:
        """A redelivery of a journaled job: answered from the journal, never generated again."""
        self.counters["duplicates"] += 1
        stored = record.answer or record.error
        if stored is None:
            log.info("mqtt duplicate delivery of a job in progress ignored", key=record.key)
            return
        log.info("mqtt duplicate job answered from the journal", key=record.key, state=record.state.value)
        self._publish(reply, {**stored, "duplicate": True})

    def _final(self, job: Job) -> dict[str, Any]:
        if job.result is not None:
            return done_message(job.result, self.device_id)
        return error_message(job.id, job.error or EdgedError("no result"), self.device_id)

    async def _relay(self, job: Job, reply: Reply, key: str | None) -> None:
        seq = 0
        async for event in job.events():
            if isinstance(event, Delta):
                chunk = ChunkMessage(id=job.id, seq=seq, delta=event.text, kind=event.kind)
                self._publish(reply, chunk.dump())
                seq += 1
            elif isinstance(event, Failed) and isinstance(event.error, ShuttingDown) and key is not None:
                log.info("job left in the journal for the next start", job_id=job.id)
            elif isinstance(event, (Finished, Failed)):
                await self._answer(key, reply, self._final(job))

    async def _answer(self, key: str | None, reply: Reply, message: dict[str, Any]) -> None:
        """Record the answer, then publish it: a crash in between publishes it again at the next
        start (once recorded it is never generated again)."""
        if key is not None and self.intake is not None:
            try:
                await self.intake.settle(key, message)
            except (JournalUnavailable, InvalidTransition) as exc:
                log.error("could not record the answer; publishing it anyway", key=key, error=str(exc))
        self._publish(reply, message, key=key)

    def _publish(self, reply: Reply, message: dict[str, Any], key: str | None = None) -> None:
        """QoS 1; while disconnected paho keeps the message and sends it after reconnecting.
        ``key``: the journal row marked ``answered`` when this message's PUBACK comes back."""
        props = None
        if self._v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = "application/json"
            if reply.correlation is not None:
                props.CorrelationData = reply.correlation
        self._send(reply.topic, message, qos=QOS, properties=props, key=key)

    def _send(
        self,
        topic: str,
        message: dict[str, Any],
        *,
        qos: int,
        retain: bool = False,
        properties: Properties | None = None,
        key: str | None = None,
    ) -> paho.MQTTMessageInfo | None:
        """Every publish goes through here, so each PUBACK finds what it acknowledges."""
        try:
            info = self._client.publish(
                topic, _encode(message), qos=qos, retain=retain, properties=properties
            )
        except ValueError as exc:  # paho refuses the topic (a wildcard): nothing can be sent there
            log.error("mqtt publish refused", topic=topic, error=str(exc))
            if key is not None and self.intake is not None:
                self.intake.answered(key)  # the answer stays in the journal; nobody can be told
            return None
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.error("mqtt publish failed", topic=topic, rc=paho.error_string(info.rc))
        with self._acks_lock:
            early = info.mid in self._acked_early
            if early:
                self._acked_early.discard(info.mid)
            else:
                self._awaiting[info.mid] = key
                if key is not None:
                    self._unacked_answers += 1
        if early and key is not None and self.intake is not None:
            self.intake.answered(key)
        return info

    def _on_publish(
        self, _client: paho.Client, _userdata: Any, mid: int, reason: ReasonCode, _props: Any
    ) -> None:
        with self._acks_lock:
            if mid not in self._awaiting:
                self._acked_early.add(mid)
                return
            key = self._awaiting.pop(mid)
            if key is not None:
                self._unacked_answers -= 1
        if key is None or self.intake is None:
            return
        if reason.is_failure:
            log.error("the broker refused an answer; not sent again", key=key, reason=str(reason))
        self.intake.answered(key)

    def publish_telemetry(self, report: dict[str, Any]) -> None:
        """QoS 0 and not queued while offline: a stale reading is worth less than the next one."""
        if self._client.is_connected():
            self._send(self.topics.telemetry, report, qos=0)

    def status(self) -> dict[str, Any]:
        return {
            "host": self.broker.host,
            "port": self.broker.effective_port,
            "connected": self._client.is_connected(),
            "journal": self.intake is not None,
            "counters": dict(self.counters),
            "topics": {
                "jobs": self.topics.jobs,
                "fleet": self.topics.fleet_subscription if self.config.fleet else None,
                "cancel": self.topics.cancel,
                "status": self.topics.status,
                "telemetry": self.topics.telemetry,
            },
        }
