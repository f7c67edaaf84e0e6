"""The worker runtime: consume loop, retries, dead letters, replay and the idempotency ledger.

Built-in handlers and third-party plugins use it the same way: through the contract in
:mod:`handlers.types`, never by importing from here. Each enabled handler reads its topics
in its own consumer group; one event goes one way through these modules, each of one role:

* ``service`` — the wiring of a worker process (:func:`~handlers.worker.service.open_worker`):
  plugins, ledger, the handlers' start and stop around the runners.
* ``runner`` — one handler's consume loop: fetch with back-pressure, per-key lanes
  (order per customer, ``concurrency`` across customers), commit, revoke, drain.
* ``offsets`` — per partition, what is finished and which offset may be committed.
* ``attempts`` — one record to a final outcome: identify, ledger check, handler calls
  with their timeout, retries, completion or dead letter.
* ``retry`` — which handler failures are retried and when; the capped back-off for broker
  and ledger errors, which never end the loop and never count as attempts.
* ``dead_letters`` — the dead-letter format (``dlq-*`` headers), written and read there.
* ``replay`` — ``pubrelay dlq list`` and ``pubrelay replay``; it imports the format, not the
  consume loop.
* ``ledger`` — which events each handler completed (duplicates are not handled twice).
* ``metrics`` — the worker's Prometheus series; ``error_text`` — exceptions as log text.

This package imports nothing on purpose: ``pubrelay dlq list`` loads only what it uses.
"""
