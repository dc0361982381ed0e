"""Operations: metrics, readings, alarms, the /metrics and health server, systemd notify,
and the status document."""
