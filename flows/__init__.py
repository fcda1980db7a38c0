"""dermaflow's outer edge: the CLI and the Prefect flows.

Importing this package sets Prefect's defaults for a quiet local start before Prefect itself is
imported (its settings are read once, at import): no anonymous telemetry (its service also
raced the temporary server's sqlite at start, ``database is locked``), and a start-up wait long
enough for a busy 2-core machine. Either one set in the environment wins.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
