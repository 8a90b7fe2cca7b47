"""Fixtures starting the real services of ``services.py`` for one test and stopping them after it."""

import pytest

from tests.runtime.line.services import require_broker, require_rtsp_server


@pytest.fixture
def mqtt_broker(tmp_path):
    broker = require_broker(tmp_path / "broker")
    yield broker
    broker.stop()


@pytest.fixture
def rtsp_server(tmp_path):
    server = require_rtsp_server(tmp_path / "rtsp")
    yield server
    server.stop()
