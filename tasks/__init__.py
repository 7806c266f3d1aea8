"""Prefect tasks: one per stage, each a thin wrapper over one core function.

Tasks pass paths, URIs and small dicts, never models or tensors (Prefect hashes inputs and stores
results as JSON). Quiet, offline-friendly Prefect defaults are set here, before prefect is first
imported; any value the user exported wins.
"""

import os

for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # core/ logs with the standard logging module: route it into the Prefect run logs too.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "core",
}.items():
    os.environ.setdefault(_key, _value)
