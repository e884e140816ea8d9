"""Energy telemetry: the worker process (ingest, spool, sinks) and what the gateway reads of it.

What both processes need is defined here, so neither imports the other's dependencies: the
gateway does not import the worker (numpy), the worker not the gateway's metrics
(prometheus_client).
"""

# The gateway's pid, set by the gateway when it starts the telemetry worker: a gateway
# killed while the worker was still importing is noticed too (getppid() is then init's).
PARENT_PID_ENV = "SCGW_TELEMETRY_PARENT_PID"


def health_topic(root: str, site_id: str) -> str:
    """Where the worker publishes its retained health report (gateway.telemetry.health)."""
    return f"{root}/gateway/{site_id}/telemetry"
