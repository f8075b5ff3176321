"""MQTT transport: IoT devices publish prompts, edged publishes answers (paho-mqtt 2.x).

It only translates between MQTT messages and the engine's `JobRequest` / job events. Delivery is at
least once: jobs arrive at QoS 1 on a persistent session and are acknowledged to the broker only
after the engine has taken them; MQTT v5 Receive Maximum keeps the broker from pushing more
unacknowledged jobs than the queue can hold.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from paho.mqtt import client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError

from edged.engine import Delta, Engine, Failed, Finished, Job, JobRequest, JobResult
from edged.errors import EdgedError, InvalidRequest, PayloadTooLarge, QueueFull, TransportError

if TYPE_CHECKING:
    from edged.config import MqttConfig, Settings

log = structlog.get_logger(__name__)

QOS = 1


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
        )


@dataclass(frozen=True)
class Reply:
    """Where an answer goes, and the v5 correlation data to echo."""

    topic: str
    correlation: bytes | None = None


def _id_hint(data: Any) -> str | None:
    if isinstance(data, dict) and isinstance(data.get("id"), str):
        return data["id"]
    return None


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
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from exc
    if isinstance(data, str):
        return JobRequest(prompt=data), None
    if not isinstance(data, dict):
        raise InvalidRequest("a job must be a JSON object or a plain-text prompt")
    reply_to = data.pop("reply_to", None)
    if reply_to is not None and (
        not isinstance(reply_to, str) or not reply_to or "+" in reply_to or "#" in reply_to
    ):
        raise InvalidRequest("reply_to must be a topic name without wildcards", param="reply_to")
    try:
        return JobRequest.model_validate(data), reply_to
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'job'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidRequest(f"invalid job: {problems}") from exc


def done_message(result: JobResult, device_id: str) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": result.id,
        "status": "done",
        "content": result.content,
        "reasoning_content": result.reasoning_content,
        "finish_reason": result.finish_reason,
        "usage": result.usage.model_dump(),
        "timings": result.timings.model_dump(),
        "model": result.model,
        "device_id": device_id,
    }
    if result.notes:
        message["notes"] = result.notes  # settings the backend could not apply to this job
    if result.parsed is not None:
        message["parsed"] = result.parsed  # a JSON response_format: the answer, parsed and validated
    return message


def error_message(job_id: str | None, error: EdgedError, device_id: str) -> dict[str, Any]:
    return {"id": job_id, "status": "error", "error": error.to_dict()["error"], "device_id": device_id}


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
    ) -> None:
        self.engine = engine
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
        self._client = self._make_client()

    # -- connection -----------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        cfg = self.config
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"edged-{self.device_id}",
            protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311,
            clean_session=None if self._v5 else False,
            manual_ack=True,
        )
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password.get_secret_value() if cfg.password else None)
        if cfg.tls.active:
            try:
                context = ssl.create_default_context(cafile=str(cfg.tls.ca) if cfg.tls.ca else None)
                if cfg.tls.cert and cfg.tls.key:
                    context.load_cert_chain(str(cfg.tls.cert), str(cfg.tls.key))
            except (OSError, ssl.SSLError) as exc:
                raise TransportError(f"cannot set up TLS for MQTT: {exc}") from exc
            if not cfg.tls.verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            client.tls_set_context(context)
        client.will_set(
            self.topics.status, _encode({**self.presence(), "state": "offline"}), qos=QOS, retain=True
        )
        client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _connect_properties(self) -> Properties | None:
        if not self._v5:
            return None
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.config.session_expiry_s
        # As many unacknowledged jobs as edged can hold: every slot plus the queue.
        props.ReceiveMaximum = max(1, min(65535, self.engine.receive_maximum))
        return props

    def start(self) -> None:
        cfg = self.config
        log.info(
            "mqtt connecting",
            host=cfg.host,
            port=cfg.effective_port,
            protocol=cfg.protocol,
            tls=cfg.tls.active,
            client_id=f"edged-{self.device_id}",
        )
        kwargs: dict[str, Any] = {"properties": self._connect_properties()}
        if self._v5:
            kwargs["clean_start"] = False
        self._client.connect_async(str(cfg.host), cfg.effective_port, cfg.keepalive_s, **kwargs)
        self._client.loop_start()

    async def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline`` ourselves (the will is only for crashes), then disconnect."""
        if self._client.is_connected():
            info = self._client.publish(
                self.topics.status, _encode({**self.presence(), "state": "offline"}), qos=QOS, retain=True
            )
            await asyncio.to_thread(info.wait_for_publish, timeout)
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
        subscriptions = [(self.topics.jobs, QOS), (self.topics.cancel, QOS)]
        if self.config.fleet:
            subscriptions.append((self.topics.fleet_subscription, QOS))
        client.subscribe(subscriptions)
        self.publish_presence(client)
        for topic, config in self.discovery.items():
            client.publish(topic, _encode(config), qos=QOS, retain=True)
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
        client.publish(self.topics.status, _encode({**presence, "state": "online"}), qos=QOS, retain=True)

    def _on_connect_fail(self, _client: paho.Client, _userdata: Any) -> None:
        log.error(
            "mqtt connection failed; retrying",
            host=self.config.host,
            port=self.config.effective_port,
            tls=self.config.tls.active,
            hint="check mqtt.tls.ca against the broker's certificate"
            if self.config.tls.active
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
        task = self._loop.create_task(self._handle(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- inbound --------------------------------------------------------------------------------

    def _reply_of(self, message: paho.MQTTMessage) -> Reply | None:
        props = getattr(message, "properties", None)
        topic = getattr(props, "ResponseTopic", None) if props is not None else None
        if not topic:
            return None
        correlation = getattr(props, "CorrelationData", None)
        return Reply(topic, bytes(correlation) if correlation is not None else None)

    async def _handle(self, message: paho.MQTTMessage) -> None:
        """Every message is answered or acted on, then acknowledged; nothing here may raise."""
        try:
            if message.topic == self.topics.cancel:
                self._cancel(bytes(message.payload))
            else:
                await self._take_job(message)
        except asyncio.CancelledError:
            # Shutting down before the engine took the job: no ack, so the broker delivers it again.
            raise
        except Exception:  # a bug here must not lose the broker's message silently
            log.exception("mqtt message handling failed", topic=message.topic)
            self._client.ack(message.mid, message.qos)
        else:
            self._client.ack(message.mid, message.qos)

    def _cancel(self, payload: bytes) -> None:
        try:
            data = json.loads(payload)
            job_id = data["id"] if isinstance(data, dict) else None
            if not isinstance(job_id, str):
                raise InvalidRequest('a cancel message is {"id": "<job id>"}')
            job = self.engine.cancel(job_id, "cancelled over MQTT")
            log.info("mqtt cancel", job_id=job_id, state=job.state.value)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._publish(
                Reply(self.topics.errors),
                error_message(None, InvalidRequest("cancel payload is not JSON"), self.device_id),
            )
        except EdgedError as exc:
            self._publish(Reply(self.topics.errors), error_message(None, exc, self.device_id))

    async def _take_job(self, message: paho.MQTTMessage) -> None:
        reply = self._reply_of(message)
        try:
            request, reply_to = parse_job(bytes(message.payload), self.settings.jobs.max_payload_bytes)
        except EdgedError as exc:
            hint = None
            if not isinstance(exc, PayloadTooLarge):
                try:
                    hint = _id_hint(json.loads(message.payload))
                except (ValueError, UnicodeDecodeError):
                    hint = None
            self._publish(reply or Reply(self.topics.errors), error_message(hint, exc, self.device_id))
            return
        job_id = request.id or f"job-{uuid.uuid4().hex[:16]}"
        request = request.model_copy(update={"id": job_id})
        if reply is None:
            reply = Reply(reply_to or f"{self.topics.results}/{job_id}")

        known = self.engine.recent(job_id)
        if known is not None:
            if known.finished:
                log.info("mqtt duplicate job answered from the stored result", job_id=job_id)
                self._publish(reply, self._final(known, duplicate=True))
            else:
                log.info("mqtt duplicate delivery of a job in progress ignored", job_id=job_id)
            return

        async with self._submit_lock:  # one at a time, in arrival order, so room is not raced for
            while True:
                await self.engine.wait_for_room()
                try:
                    job = await self.engine.submit(request, origin="mqtt")
                    break
                except QueueFull:
                    continue  # a socket client took the room meanwhile: wait again, the message is not acked
                except EdgedError as exc:
                    self._publish(reply, error_message(job_id, exc, self.device_id))
                    return
        task = self._loop.create_task(self._relay(job, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- outbound -------------------------------------------------------------------------------

    def _final(self, job: Job, duplicate: bool = False) -> dict[str, Any]:
        if job.result is not None:
            message = done_message(job.result, self.device_id)
        else:
            message = error_message(job.id, job.error or EdgedError("no result"), self.device_id)
        if duplicate:
            message["duplicate"] = True
        return message

    async def _relay(self, job: Job, reply: Reply) -> None:
        seq = 0
        async for event in job.events():
            if isinstance(event, Delta):
                self._publish(reply, {"id": job.id, "seq": seq, "delta": event.text, "kind": event.kind})
                seq += 1
            elif isinstance(event, (Finished, Failed)):
                self._publish(reply, self._final(job))

    def _publish(self, reply: Reply, message: dict[str, Any]) -> None:
        """QoS 1; while disconnected paho keeps the message and sends it after reconnecting."""
        props = None
        if self._v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = "application/json"
            if reply.correlation is not None:
                props.CorrelationData = reply.correlation
        info = self._client.publish(reply.topic, _encode(message), qos=QOS, properties=props)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.error("mqtt publish failed", topic=reply.topic, rc=paho.error_string(info.rc))

    def publish_telemetry(self, report: dict[str, Any]) -> None:
        """QoS 0 and not queued while offline: a stale reading is worth less than the next one."""
        if self._client.is_connected():
            self._client.publish(self.topics.telemetry, _encode(report), qos=0)

    def status(self) -> dict[str, Any]:
        return {
            "host": self.config.host,
            "port": self.config.effective_port,
            "connected": self._client.is_connected(),
            "topics": {
                "jobs": self.topics.jobs,
                "fleet": self.topics.fleet_subscription if self.config.fleet else None,
                "cancel": self.topics.cancel,
                "status": self.topics.status,
                "telemetry": self.topics.telemetry,
            },
        }
