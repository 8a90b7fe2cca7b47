"""The webhook sink: a JSON POST per anomalous, UNKNOWN or camera-blind event, retried with backoff
(urllib from the standard library: one request per event needs no HTTP client package)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

from reconad.runtime.errors import ReconadError
from reconad.runtime.line.sinks import CameraBlind, Event, InspectionResult

WEBHOOK_AUTHORIZATION_ENV = "RECONAD_WEBHOOK_AUTHORIZATION"
RETRY_STATUSES = (408, 425, 429, 500, 502, 503, 504)  # worth another try; any other 4xx will fail again


def parse_headers(lines: Sequence[str]) -> dict[str, str]:
    """``["Name: value", ...]`` -> ``{"Name": "value"}``; refuses a line without a name and a colon."""
    headers = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or any(c in name for c in " \t\r\n"):
            raise ReconadError(f"A webhook header is 'Name: value', got {line!r}.")
        if name.strip().lower() == "authorization":
            raise ReconadError(
                f"Do not pass the Authorization header on the command line (every user can read it): "
                f"set {WEBHOOK_AUTHORIZATION_ENV} or give --webhook-auth-file."
            )
        headers[name.strip()] = value.strip()
    return headers


class WebhookSink:
    """POSTs a JSON event to ``url`` for each anomalous frame (``"event": "anomaly"``), each UNKNOWN one
    (``"event": "unknown"``: unlike every trained product, not judged) and the start of each
    camera-blind episode (``"event": "camera_blind"``), retrying with exponential backoff.

    A refused connection, a timeout, HTTP 408/425/429 or a 5xx is tried again after ``backoff_s``,
    doubling up to ``backoff_max_s`` (a ``Retry-After`` in seconds is obeyed, within that cap), at most
    ``retries`` more times; another 4xx fails at once. A final failure raises; the worker counts it
    and the loop goes on. Retries wait on the webhook's own thread, never on inference; while they wait
    new events queue (``queue_size``, oldest dropped and counted).

    Args:
        headers: extra request headers (``parse_headers``); never the Authorization header, which comes
            from ``authorization`` (read by ``secret_from`` from a file or $RECONAD_WEBHOOK_AUTHORIZATION).
    """

    name = "webhook"

    def __init__(self, url: str, *, timeout_s: float = 2.0, queue_size: int = 16, headers: Mapping[str, str] = {},
                 authorization: str | None = None, retries: int = 3, backoff_s: float = 0.5,
                 backoff_max_s: float = 8.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ReconadError(f"The webhook must be an http:// or https:// URL, got {url!r}.")
        if retries < 0 or backoff_s < 0 or backoff_max_s < backoff_s:
            raise ReconadError("Webhook retries must be >= 0 and 0 <= backoff <= maximum backoff.")
        self.url = url
        self.timeout_s = timeout_s
        self.queue_size = queue_size
        self.headers = {"Content-Type": "application/json", **headers}
        if authorization is not None:
            self.headers["Authorization"] = authorization
        self.retries, self.backoff_s, self.backoff_max_s = retries, backoff_s, backoff_max_s
        self.attempts = 0  # requests sent, retries included
        self._sleep = time.sleep

    def accepts(self, result: Event) -> bool:
        if isinstance(result, CameraBlind):
            return result.episode_start
        return isinstance(result, InspectionResult) and bool(result.verdict.is_anomalous or result.verdict.is_unknown)

    def write(self, result: Event) -> bool:
        if isinstance(result, CameraBlind):
            event = "camera_blind"
        else:
            event = "unknown" if result.verdict.is_unknown else "anomaly"
        body = json.dumps({"event": event, **result.record()}).encode("utf-8")
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            failure, wait = self._post(body)
            if failure is None:
                return True
            if wait is None or attempt == self.retries:
                suffix = f" after {attempt + 1} attempts" if attempt else ""
                raise ReconadError(f"{failure}{suffix}")
            self._sleep(min(max(delay, wait), self.backoff_max_s))
            delay = min(delay * 2, self.backoff_max_s)
        raise AssertionError("unreachable")

    def _post(self, body: bytes) -> tuple[str | None, float | None]:
        """(None, None) on success; else (why, seconds to wait at least, or None when retrying is futile)."""
        self.attempts += 1
        request = urllib.request.Request(self.url, data=body, method="POST", headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
            return None, None
        except urllib.error.HTTPError as error:
            message = f"webhook {self.url} answered HTTP {error.code}"
            if error.code not in RETRY_STATUSES:
                return message, None
            retry_after = error.headers.get("Retry-After", "") if error.headers else ""
            return message, float(retry_after) if retry_after.strip().isdigit() else 0.0
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            return f"webhook {self.url} unreachable: {reason}", 0.0

    def close(self) -> None:
        pass
