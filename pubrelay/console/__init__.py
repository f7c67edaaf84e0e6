"""The operator console: ``/console/`` pages over the event index, dead letters and quarantine."""
