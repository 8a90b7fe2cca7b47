"""The inspection line: frame sources by URI, the threaded loop and its queues, sinks (JSONL, overlays,
webhook, MQTT, Prometheus metrics, video outputs), the one renderer, statistics, and the
``recon-inspect run`` session that ties them to an artifact."""
