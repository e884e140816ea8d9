"""telemetry."""

# The gateway's pid, set by the gateway when it starts the telemetry worker: a gateway
# killed while the worker was still importing is noticed too (getppid() is then init's).
# Here, not in worker.py, so the gateway need not import the worker (and numpy) to say it.
PARENT_PID_ENV = "SCGW_TELEMETRY_PARENT_PID"
