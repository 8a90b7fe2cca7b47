"""The inspection line: frame sources by URI, the threaded loop and its queues, sinks, statistics, and the
``recon-inspect run`` session that ties them to an artifact."""
