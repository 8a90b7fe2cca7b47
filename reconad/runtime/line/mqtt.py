"""The MQTT sink: every verdict (or only anomalies) as one JSON message to a broker, for a PLC or an MES.

``--mqtt mqtt://[user@]host[:port]/line1/verdicts`` (``mqtts://`` for TLS, port 8883 by default). The
client is paho-mqtt (extra ``line``); its network thread connects, and reconnects with exponential
backoff, in the background. Messages wait in a bounded buffer while the broker is away (the oldest is
dropped and counted when it is full) and go out in order once it is back; a sender thread of our own
hands them over, so ``write`` (on the loop's sink worker) never waits for the network. Passwords come
from the environment or a file, never from the URL, which shows in every process list. The broker is
also told ``online``/``offline`` on ``<topic>/status`` (retained, and as the will when we vanish).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from reconad.runtime.errors import ReconadError
from reconad.runtime.line.secrets import secret_from

PASSWORD_ENV = "RECONAD_MQTT_PASSWORD"
USERNAME_ENV = "RECONAD_MQTT_USERNAME"
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
EVENTS = ("all", "anomalies")
STATUS_SUFFIX = "/status"


def import_paho() -> Any:
    """paho-mqtt's client module, or a one-sentence ``ReconadError`` naming the extra to install."""
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise ReconadError("--mqtt needs paho-mqtt; install it with pip install 'reconad[line]'.") from None
    return mqtt


@dataclasses.dataclass(frozen=True)
class MqttTarget:
    """Where messages go, parsed from an ``mqtt://`` or ``mqtts://`` URI.

    Attributes:
        host: broker host name or address.
        port: broker TCP port.
        topic: the topic every message is published to (no wildcards).
        tls: True for ``mqtts://``.
        username: the user named in the URI (``mqtt://user@host/...``), or None.
    """

    host: str
    port: int
    topic: str
    tls: bool
    username: str | None = None

    @property
    def status_topic(self) -> str:
        return self.topic + STATUS_SUFFIX


def parse_mqtt_uri(uri: str) -> MqttTarget:
    """``mqtt://[user@]host[:port]/topic/levels`` -> ``MqttTarget``; raises ``ReconadError`` on a bad URI."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ReconadError(f"An MQTT target is mqtt://host[:port]/topic or mqtts://host[:port]/topic, got {uri!r}.")
    if parts.password is not None:
        raise ReconadError(
            f"Do not put the MQTT password in the URL (it shows in the process list): "
            f"set {PASSWORD_ENV} or give a password file."
        )
    if not parts.hostname:
        raise ReconadError(f"The MQTT URI {uri!r} names no broker host.")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise ReconadError(f"The MQTT URI {uri!r} has an invalid port.") from None
    topic = unquote(parts.path.lstrip("/")) + ("#" if "#" in uri else "")  # urlsplit cuts a '#' as a fragment
    if "+" in topic or "#" in topic:
        raise ReconadError(f"The MQTT topic {topic!r} has a wildcard (+ or #); messages need a plain topic.")
    if not topic or topic.endswith("/"):
        raise ReconadError(f"The MQTT URI {uri!r} names no topic: add it as the path, e.g. mqtt://host/line1/verdicts.")
    username = unquote(parts.username) if parts.username else None
    return MqttTarget(host=parts.hostname, port=port, topic=topic, tls=scheme == "mqtts", username=username)


@dataclasses.dataclass(frozen=True)
class MqttConfig:
    """How to publish; each field is the ``recon-inspect run`` option ``--mqtt-<field>`` (``uri`` is ``--mqtt``)."""

    uri: str
    qos: int = 1  # 0 at most once, 1 at least once (a PLC may see a repeat after a reconnect), 2 exactly once
    retain: bool = False  # the broker keeps the last verdict for subscribers that connect later
    events: str = "all"  # "all": every verdict and skipped frame; "anomalies": anomalies and camera-blind episodes
    client_id: str | None = None  # None: reconad-<host>-<pid>
    username: str | None = None  # overrides the URI's user; else $RECONAD_MQTT_USERNAME
    password_file: Path | None = None  # first line is the password; else $RECONAD_MQTT_PASSWORD
    ca_file: Path | None = None  # mqtts: CA bundle to verify the broker; None: the system's
    cert_file: Path | None = None  # mqtts: client certificate, for brokers that require one
    key_file: Path | None = None
    tls_insecure: bool = False  # mqtts: skip the broker host name check (self-signed lab brokers)
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5  # first wait before reconnecting; doubles per failure
    reconnect_max_s: float = 30.0
    buffer_size: int = 10_000  # messages held while the broker is away (~6 min at 30 fps); then drop oldest
    inflight: int = 20  # QoS 1/2 messages sent but not yet acknowledged
    close_timeout_s: float = 5.0  # at stop, how long buffered messages may take to go out

    def __post_init__(self) -> None:
        parse_mqtt_uri(self.uri)  # a bad URI is refused with the options, before any model is loaded
        if self.qos not in (0, 1, 2):
            raise ReconadError(f"MQTT QoS must be 0, 1 or 2, got {self.qos}.")
        if self.events not in EVENTS:
            raise ReconadError(f"MQTT events must be one of {list(EVENTS)}, got {self.events!r}.")
        if self.buffer_size < 1 or self.inflight < 1:
            raise ReconadError("The MQTT buffer size and in-flight window must be at least 1.")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ReconadError("MQTT reconnect delays must satisfy 0 < min <= max.")


def resolve_credentials(target: MqttTarget, config: MqttConfig, environ=os.environ) -> tuple[str | None, str | None]:
    """(username, password): the config's, the URI's or the environment's user; the file's or env password."""
    username = config.username or target.username or environ.get(USERNAME_ENV) or None
    password = secret_from(config.password_file, PASSWORD_ENV, "MQTT password", environ)
    if password is not None and username is None:
        raise ReconadError(f"An MQTT password is set but no user: put it in the URI (mqtt://user@host/...) or {USERNAME_ENV}.")
    return username, password


@dataclasses.dataclass(frozen=True)
class MqttCounters:
    """What happened to the messages so far.

    Attributes:
        queued: messages accepted by ``write``.
        sent: handed to the broker connection (QoS 0: written to the socket).
        acknowledged: confirmed by the broker (QoS 1/2) or written (QoS 0).
        dropped: thrown away, oldest first, because the buffer was full while the broker was away.
        unsent: still buffered or unacknowledged when the sink closed.
        buffered: waiting now.
        connects: successful connections (the first one included).
        disconnects: connections lost (not counting our own at close).
        last_error: why the last connection attempt failed or ended, or None.
    """

    queued: int = 0
    sent: int = 0
    acknowledged: int = 0
    dropped: int = 0
    unsent: int = 0
    buffered: int = 0
    connects: int = 0
    disconnects: int = 0
    last_error: str | None = None


def message_for(result: Any) -> dict[str, Any]:
    """The JSON message of a loop result: ``{"event": "verdict"|"fault"|"camera_blind", ...result.record()}``.

    ``category`` (the product) is added from the verdict when it has one (issue 11's graph output).
    """
    record = result.record()
    verdict = getattr(result, "verdict", None)
    message = {"event": getattr(result, "event", "verdict" if verdict is not None else "fault"), **record}
    if verdict is None:
        return message
    category = getattr(verdict, "category", None)
    if category is not None and "category" not in message:
        message["category"] = category
    return message


class MqttSink:
    """Publishes loop results to one MQTT topic; see the module docstring for the delivery rules.

    Implements the loop's ``Sink`` protocol. ``write`` serialises and buffers (microseconds, never the
    network); ``close`` waits up to ``close_timeout_s`` for the buffer to drain, says ``offline`` and
    disconnects. ``counters()`` reports queued/sent/acknowledged/dropped messages and connections.

    Args:
        config: the target URI and options.
        run_id: added to every message as ``"run"`` when given.
        warn: receives one line per connection problem (use the loop's rate-limited reporter).
        environ: where ``RECONAD_MQTT_USERNAME`` / ``RECONAD_MQTT_PASSWORD`` are read.

    Raises:
        ReconadError: bad URI or options, unreadable secret or certificate files, paho-mqtt missing.
    """

    name = "mqtt"

    def __init__(
        self,
        config: MqttConfig,
        *,
        run_id: str | None = None,
        queue_size: int = 64,
        warn: Callable[[str], None] = print,
        environ=os.environ,
    ) -> None:
        mqtt = import_paho()
        self._mqtt = mqtt
        self.config = config
        self.target = parse_mqtt_uri(config.uri)
        self.queue_size = queue_size
        self.run_id = run_id
        self._warn = warn
        self._condition = threading.Condition()
        self._buffer: collections.deque[bytes] = collections.deque()
        self._unacked: set[int] = set()  # message ids handed to paho and not yet confirmed
        self._acked_early: set[int] = set()  # confirmed while publish() had not yet returned their id
        self._counts = collections.Counter()
        self._last_error: str | None = None
        self._connected = False
        self._closing = False
        self._ever_connected = False
        username, password = resolve_credentials(self.target, config, environ)
        client_id = config.client_id or f"reconad-{socket.gethostname()}-{os.getpid()}"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if username is not None:
            client.username_pw_set(username, password)
        if self.target.tls:
            self._set_tls(client)
        elif any(getattr(config, name) for name in ("ca_file", "cert_file", "key_file")):
            raise ReconadError("MQTT certificate options need an mqtts:// URI.")
        client.max_inflight_messages_set(config.inflight)
        client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)
        client.will_set(self.target.status_topic, b"offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client
        try:
            client.connect_async(self.target.host, self.target.port, keepalive=config.keepalive_s)
        except (OSError, ValueError) as error:
            raise ReconadError(f"Cannot use the MQTT broker {self.target.host}:{self.target.port}: {error}.") from None
        client.loop_start()  # paho's network thread: connects, reconnects with backoff, reads acks
        self._sender = threading.Thread(target=self._send_main, name="mqtt-sender", daemon=True)
        self._sender.start()

    def _set_tls(self, client: Any) -> None:
        config = self.config
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(config, name)
            if path is not None and not Path(path).is_file():
                raise ReconadError(f"The MQTT {name.replace('_', ' ')} {path} does not exist.")
        if (config.cert_file is None) != (config.key_file is None):
            raise ReconadError("Give both the MQTT client certificate and its key, or neither.")
        try:
            client.tls_set(
                ca_certs=str(config.ca_file) if config.ca_file else None,
                certfile=str(config.cert_file) if config.cert_file else None,
                keyfile=str(config.key_file) if config.key_file else None,
            )
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            raise ReconadError(f"Cannot set up TLS for MQTT: {error}.") from None
        client.tls_insecure_set(config.tls_insecure)

    # the loop's sink worker ------------------------------------------------------------------------

    def accepts(self, result: Any) -> bool:
        if self.config.events == "anomalies":  # and the start of each camera-blind episode
            verdict = getattr(result, "verdict", None)
            return bool(verdict.is_anomalous) if verdict is not None else bool(getattr(result, "episode_start", False))
        return True

    def write(self, result: Any) -> bool:
        message = message_for(result)
        if self.run_id is not None:
            message = {"run": self.run_id, **message}
        payload = json.dumps(message).encode("utf-8")
        with self._condition:
            if len(self._buffer) >= self.config.buffer_size:
                self._buffer.popleft()
                self._counts["dropped"] += 1
            self._buffer.append(payload)
            self._counts["queued"] += 1
            self._condition.notify_all()
        return True

    def close(self) -> None:
        deadline = time.monotonic() + self.config.close_timeout_s
        with self._condition:
            while (self._buffer or self._unacked) and self._connected and time.monotonic() < deadline:
                self._condition.wait(0.05)
            self._closing = True
            self._condition.notify_all()
        self._sender.join(timeout=5)
        if self._connected:
            info = self._client.publish(self.target.status_topic, b"offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=max(0.5, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass  # the connection went away meanwhile; the will says offline for us
        self._client.disconnect()
        self._client.loop_stop()
        with self._condition:
            unsent = len(self._buffer) + len(self._unacked)
            self._counts["unsent"] = unsent
        if unsent:
            self._warn(f"warning: {unsent} MQTT message(s) to {self._where()} were never delivered.")

    def counters(self) -> MqttCounters:
        with self._condition:
            values = {name: self._counts[name] for name in ("queued", "sent", "acknowledged", "dropped", "unsent",
                                                           "connects", "disconnects")}
            return MqttCounters(**values, buffered=len(self._buffer), last_error=self._last_error)

    @property
    def connected(self) -> bool:
        return self._connected

    # our sender thread -------------------------------------------------------------------------------

    def _send_main(self) -> None:
        """Hand buffered messages to paho in order, while connected and the in-flight window has room."""
        mqtt, config = self._mqtt, self.config
        while True:
            with self._condition:
                while not self._closing and not (
                    self._connected and self._buffer and len(self._unacked) < config.inflight
                ):
                    self._condition.wait(0.2)
                if self._closing:
                    return
                payload = self._buffer[0]
            # Outside our lock: paho takes its own locks and calls on_publish, which takes ours.
            info = self._client.publish(self.target.topic, payload, qos=config.qos, retain=config.retain)
            with self._condition:
                if info.rc == mqtt.MQTT_ERR_SUCCESS or (info.rc == mqtt.MQTT_ERR_NO_CONN and config.qos > 0):
                    # QoS 1/2 messages refused for want of a connection stay in paho's session: sent on reconnect.
                    if self._buffer and self._buffer[0] is payload:
                        self._buffer.popleft()
                    self._counts["sent"] += 1
                    if info.mid in self._acked_early:  # paho confirmed it before publish() returned
                        self._acked_early.discard(info.mid)
                        self._counts["acknowledged"] += 1
                    else:
                        self._unacked.add(info.mid)
                else:
                    self._condition.wait(0.05)  # no connection (QoS 0): keep it and wait for on_connect

    # paho's network thread ----------------------------------------------------------------------------

    def _where(self) -> str:
        return f"{self.target.host}:{self.target.port}"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._record_error(f"the MQTT broker {self._where()} refused the connection: {reason_code}")
            return
        client.publish(self.target.status_topic, b"online", qos=1, retain=True)
        with self._condition:
            self._connected = True
            self._counts["connects"] += 1
            first = not self._ever_connected
            self._ever_connected = True
            buffered = len(self._buffer) + len(self._unacked)
            self._condition.notify_all()
        if not first:
            self._warn(f"MQTT broker {self._where()} is back; {buffered} buffered message(s) going out.")

    def _on_connect_fail(self, client, userdata) -> None:
        # paho does not say why; one probe of our own does (on paho's thread, which waits anyway).
        self._record_error(f"cannot reach the MQTT broker {self._where()} ({self._diagnose()}); retrying with backoff")

    def _diagnose(self) -> str:
        """Why a connection fails: the socket's or the TLS handshake's error, in a few words."""
        import ssl

        try:
            with socket.create_connection((self.target.host, self.target.port), timeout=2.0) as raw:
                if not self.target.tls:
                    return "the connection opens now; it failed a moment ago"
                config = self.config
                context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
                if config.cert_file is not None:
                    context.load_cert_chain(str(config.cert_file), str(config.key_file))
                if config.tls_insecure:
                    context.check_hostname = False
                with context.wrap_socket(raw, server_hostname=self.target.host):
                    return "the TLS handshake works now; it failed a moment ago"
        except ssl.SSLCertVerificationError as error:
            return f"TLS: {error.verify_message}"
        except ssl.SSLError as error:
            return f"TLS: {error.reason or error}"
        except socket.gaierror as error:
            return f"unknown host: {error.strerror}"
        except OSError as error:
            return error.strerror or type(error).__name__

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._condition:
            was_connected = self._connected
            self._connected = False
            closing = self._closing
            if was_connected and not closing:
                self._counts["disconnects"] += 1
            self._condition.notify_all()
        if was_connected and not closing:
            self._record_error(f"lost the MQTT broker {self._where()} ({reason_code}); buffering up to "
                               f"{self.config.buffer_size} messages while reconnecting")

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._condition:
            if mid in self._unacked:
                self._unacked.discard(mid)
                self._counts["acknowledged"] += 1
            else:
                self._acked_early.add(mid)
            self._condition.notify_all()

    def _record_error(self, message: str) -> None:
        with self._condition:
            self._last_error = message
        self._warn(f"warning: {message.removesuffix('.')}.")
