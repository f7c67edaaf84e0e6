"""Scenarios where a process dies or comes and goes: the broker, a worker, a group member.

- ``broker-kill``: signed deliveries flow through `pubrelay webhook` to a `pubrelay worker`
  forwarding them (``http`` handler); the Tansu broker is SIGKILLed and started again on
  the same port. Proves: no 2xx without the broker (the sender re-delivers the 503s),
  acceptance and forwarding resume by themselves, nothing accepted after is lost.
- ``worker-kill``: the same flow, with one poison event; the worker is SIGKILLed three
  times mid-stream and started again each time. Proves: what was not committed is
  delivered again and the Redis ledger stops it from being forwarded twice; the poison
  event's attempts are counted across its redeliveries.
- ``rebalance``: two e-mail workers in one group against an SMTP relay that delays some
  DATA replies past ``PUBRELAY_WORKER__REVOKE_TIMEOUT_S``, while a third worker joins and
  leaves. Proves: a handler call that outlives the revoke deadline does not make the
  partition's next owner send the same e-mail again (the atomic ledger claim).

Tansu keeps its log in memory; what ``broker-kill`` cannot check because of that is counted
apart in its note (see docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import time

from aiokafka.partitioner import murmur2

from tests.chaos.fakes import PoisonReceiver, SlowSmtpServer
from tests.chaos.load import CUSTOMERS, Deliveries, event_id
from tests.chaos.report import Row, few
from tests.chaos.sizes import Sizes
from tests.chaos.stack import PARTITIONS, Run, open_stack, run_with_fault

CRASH_WINDOW_S = 1.0
KILL_MAX_ATTEMPTS = 5
JOIN_TIMEOUT_S = 60.0


def broker_kill(run: Run, sizes: Sizes) -> Row:
    row = Row("broker-kill", sent=sizes.broker_events)
    tag = "brokerkill"
    with open_stack(row.scenario, run) as stack:
        receiver = PoisonReceiver()
        receiver.start(stack.loop)
        webhook, _ = stack.start_flow("http", receiver.env(), receiver.effects, tag)
        deliveries = Deliveries()
        kill_after_s = sizes.broker_events / sizes.broker_rate_per_s / 8

        async def kill_broker() -> set[str]:
            await asyncio.sleep(kill_after_s)
            stack.broker.kill()
            unforwarded = deliveries.accepted - set(receiver.effects())
            await asyncio.sleep(sizes.broker_down_s)
            await asyncio.to_thread(stack.broker.start)
            return unforwarded

        unforwarded = run_with_fault(
            stack.send(webhook, tag, sizes.broker_events, sizes.broker_rate_per_s, deliveries),
            kill_broker,
        )
        # Tansu keeps its log in memory: what it held when killed is gone (a Kafka cluster
        # keeps it on disk and on replicas). Events accepted before the kill and not yet
        # forwarded then cannot reach the worker; they are counted apart, not as lost.
        wiped = frozenset(unforwarded)

        stale: set[str] = set()
        outside: set[str] = set()

        def tansu_artefacts(missing: set[str]) -> set[str]:
            # Two more artefacts of the wiped log, found in the restarted broker:
            # - its offsets start from 0 again, so the group's commit of its position in the
            #   old log lands in the new one above records it never read (a Kafka log never
            #   reuses an offset);
            # - the worker's metadata request re-creates the topic with Tansu's default of
            #   4 partitions, yet Tansu acknowledges writes to partitions 4 and 5, which no
            #   consumer then sees (a Kafka cluster keeps the topic and refuses a partition
            #   it does not have).
            committed = stack.committed("http")
            stale.update(e for e in missing if _behind(stack.positions.get(e), committed))
            partitions = stack.partition_count()
            outside.update(e for e in missing if _partition(e) >= partitions)
            return stale | outside

        lost = stack.finish(
            row,
            receiver.effects,
            deliveries,
            tag=tag,
            handler="http",
            settle_s=sizes.settle_s,
            excused=wiped,
            explain=tansu_artefacts,
        )
        row.peak_rss_mib = stack.peak_rss_mib
        refused = deliveries.tries - len(deliveries.status)
        row.notes.insert(
            0,
            f"broker down {sizes.broker_down_s:.0f} s after {kill_after_s:.0f} s; "
            f"{refused} non-2xx answers re-delivered; {len(wiped)} accepted before the kill "
            "and not yet forwarded were wiped with Tansu's in-memory log (not counted)",
        )
        row.notes.insert(
            1,
            f"after the restart, not counted: {len(stale)} at offsets below the group's commit "
            f"from the old log, {len(outside - stale)} in partitions the topic Tansu re-created "
            "does not have",
        )
        if lost:
            row.notes.append(f"lost: {few(lost)}")
    return row


def _partition(event: str) -> int:
    """The partition the intake's producer picks for an event's key (aiokafka's default
    partitioner: murmur2 of the key, over the topic's partitions when it was created)."""
    tag, _, n = event.rpartition("_ev")
    key = f"{tag}_cust{int(n) % CUSTOMERS}"
    hashed: int = murmur2(key.encode())
    return (hashed & 0x7FFFFFFF) % PARTITIONS


def _behind(position: tuple[int, int] | None, committed: dict[int, int]) -> bool:
    if position is None:
        return False
    partition, offset = position
    return offset < committed.get(partition, 0)


def worker_kill(run: Run, sizes: Sizes) -> Row:
    row = Row("worker-kill x3", sent=sizes.kill_events)
    tag = "workerkill"
    poison = event_id(tag, sizes.kill_events // 8)
    with open_stack(row.scenario.replace(" ", "-"), run) as stack:
        receiver = PoisonReceiver(poison={poison})
        receiver.start(stack.loop)
        env = {**receiver.env(), "PUBRELAY_WORKER__MAX_ATTEMPTS": str(KILL_MAX_ATTEMPTS)}
        webhook, (worker,) = stack.start_flow("http", env, receiver.effects, tag)
        deliveries = Deliveries()
        duration_s = sizes.kill_events / sizes.kill_rate_per_s
        kills: list[float] = []

        async def kill_worker() -> None:
            nonlocal worker
            for _ in range(3):
                await asyncio.sleep(duration_s / 4)
                worker.kill()
                kills.append(time.monotonic())
                worker = await asyncio.to_thread(stack.start, "worker", ["http"], env)

        run_with_fault(
            stack.send(webhook, tag, sizes.kill_events, sizes.kill_rate_per_s, deliveries),
            kill_worker,
        )
        lost = stack.finish(
            row, receiver.effects, deliveries, handler="http", tag=tag, settle_s=sizes.settle_s
        )
        row.peak_rss_mib = stack.peak_rss_mib
        letters = [d for d in stack.dead_letters("http") if d.event_id == poison]
        row.notes.insert(
            0,
            "3 SIGKILLs, restarted each time; Redis ledger; the poison event was tried "
            f"{receiver.poison_attempts[poison]} times in all (MAX_ATTEMPTS "
            f"{KILL_MAX_ATTEMPTS}; each SIGKILL may add the attempt it interrupted), "
            + (f"dead-lettered after {letters[0].attempts}" if letters else "no dead letter"),
        )
        if receiver.poison_attempts[poison] > KILL_MAX_ATTEMPTS + len(kills):
            row.error = "the poison event's attempts did not survive its redeliveries"
        repeated = sorted(e for e, n in receiver.effects().items() if n > 1)
        if repeated:
            _split_crash_window(row, repeated, receiver.arrivals, kills)
        if lost:
            row.notes.append(f"lost: {few(lost)}")
    return row


def _split_crash_window(
    row: Row, repeated: list[str], arrivals: list[tuple[str, float]], kills: list[float]
) -> None:
    """Move to ``crash_window`` the repeats whose first effect landed less than
    ``CRASH_WINDOW_S`` before a SIGKILL and whose second came after it (the next delivery,
    after the restart); note how close to the kill the latest of them landed."""
    times: dict[str, list[float]] = {}
    for event, at in arrivals:
        times.setdefault(event, []).append(at)
    gaps: list[float] = []
    outside: list[str] = []
    for event in repeated:
        first, second = times[event][0], times[event][1]
        kill = next((k for k in kills if 0 <= k - first < CRASH_WINDOW_S and second > k), None)
        if kill is None:
            outside.append(event)
        else:
            gaps.append(kill - first)
    row.crash_window = len(gaps)
    row.repeated = len(outside)
    if gaps:
        row.notes.append(
            f"crash window: {len(gaps)} effect(s) landed at most {max(gaps) * 1000:.0f} ms "
            "before a SIGKILL, the ledger not yet told, and ran again after the restart"
        )
    if outside:
        row.notes.append(f"repeated: {few(outside)}")


def rebalance(run: Run, sizes: Sizes) -> Row:
    row = Row("rebalance, slow SMTP", sent=sizes.rebalance_events)
    tag = "rebalance"
    with open_stack("rebalance", run) as stack:
        smtp = SlowSmtpServer(delay_s=sizes.revoke_timeout_s + sizes.smtp_delay_s, slow_every=4)
        with smtp.serving():
            env = {
                **smtp.env(),
                "PUBRELAY_WORKER__REVOKE_TIMEOUT_S": str(sizes.revoke_timeout_s),
                "PUBRELAY_EMAIL__CONNECTIONS": "32",  # slow replies hold a connection each
            }
            webhook, _ = stack.start_flow("email", env, smtp.effects, tag, workers=2)
            deliveries = Deliveries()
            duration_s = sizes.rebalance_events / sizes.rebalance_rate_per_s

            async def join_and_leave() -> None:
                await asyncio.sleep(duration_s / 5)
                third = await asyncio.to_thread(stack.start, "worker", ["email"], env)
                deadline = time.monotonic() + JOIN_TIMEOUT_S
                while "bus_partitions_assigned" not in third.output():
                    if time.monotonic() > deadline:
                        raise RuntimeError("the third worker got no partition")
                    await asyncio.sleep(0.5)
                await asyncio.sleep(sizes.revoke_timeout_s + sizes.smtp_delay_s)
                await asyncio.to_thread(third.terminate, 30.0)

            run_with_fault(
                stack.send(
                    webhook, tag, sizes.rebalance_events, sizes.rebalance_rate_per_s, deliveries
                ),
                join_and_leave,
            )
            lost = stack.finish(
                row, smtp.effects, deliveries, handler="email", tag=tag, settle_s=sizes.settle_s
            )
        row.peak_rss_mib = stack.peak_rss_mib
        row.notes.insert(
            0,
            f"revoke timeout {sizes.revoke_timeout_s:.0f} s; {smtp.delayed} DATA replies "
            f"delayed {smtp.delay_s:.0f} s; a third worker joined and left (SIGTERM)",
        )
        row.note_repeated_and_lost(smtp.effects(), lost)
    return row
