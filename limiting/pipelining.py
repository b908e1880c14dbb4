"""Script calls of concurrent gevent requests share one round trip to the store.

Every decision is one EVALSHA, and on a small machine the round trip costs more than the
script: the worker sleeps until the reply, and waking it again costs it about as much CPU as
the call itself (measured: a 50 µs sleep adds ~40 µs of CPU to a request). Under gevent a
worker holds many requests; the first one that reaches the store yields once, so every other
request that is ready to run reaches its own call too, then sends all of them in one write
and reads the replies in order. Each call is still its own atomic script; only the trip is
shared (Valkey runs them one after another, as it would have anyway).

The budget is unchanged: the batch waits on an OS socket with the store's timeout, so a slow
store fails the calls of that batch after the budget and nothing else. Outside gevent there is
nothing to share and calls go one by one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError, ResponseError

from .metrics import STORE_ROUND_TRIPS, STORE_SCRIPT_CALLS

Call = tuple[Script, list[str], Sequence[Any]]


def gevent_patched() -> bool:
    """True in a gevent worker (sockets monkey-patched): requests run as greenlets."""
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey

    return bool(monkey.is_module_patched("socket"))


class _Pending:
    """One call waiting for the batch it joined: its result or error, and its greenlet."""

    __slots__ = ("call", "ok", "value", "waiter")

    def __init__(self, call: Call, waiter: Any) -> None:
        self.call = call
        self.waiter = waiter
        self.ok = False
        self.value: Any = None


class Pipeliner:
    """Batches the script calls made in one turn of a gevent worker's loop."""

    def __init__(self, client: redis.Redis) -> None:
        import gevent
        from gevent.hub import Waiter, get_hub

        self._hub = get_hub()
        self._pool = client.connection_pool
        self._sleep: Callable[[float], None] = gevent.sleep
        self._waiter = Waiter
        self._queue: list[_Pending] = []
        # Connections kept between trips: the pool's checks (a poll for stray data, a lock)
        # cost a syscall per trip, and a trip always reads every reply or drops the connection.
        self._idle: list[Any] = []

    def call(self, script: Script, keys: list[str], args: Sequence[Any]) -> Any:
        pending = _Pending((script, keys, args), self._waiter())
        self._queue.append(pending)
        if len(self._queue) == 1:
            # The first call of a turn leads: it lets the other ready requests queue their
            # calls behind it, then carries all of them. Whatever happens to it (even a kill
            # while it yields), the batch is sent and every waiter is answered.
            try:
                self._sleep(0)
            finally:
                batch, self._queue = self._queue, []
                self._run(batch)
        else:
            pending.waiter.get()
        if pending.ok:
            return pending.value
        raise pending.value

    def _run(self, batch: list[_Pending]) -> None:
        """Send the batch and answer every call in it; never raises."""
        STORE_ROUND_TRIPS.inc()
        STORE_SCRIPT_CALLS.inc(len(batch))
        try:
            self._send_and_read(batch)
        except BaseException as exc:  # every waiter must hear the outcome
            for pending in batch:
                if not pending.ok and pending.value is None:
                    pending.value = exc
        # A waiter may only be switched to from the hub: the waiting requests resume in turn
        # once this one yields.
        run_callback = self._hub.loop.run_callback
        for pending in batch[1:]:
            run_callback(pending.waiter.switch, None)

    def _send_and_read(self, batch: list[_Pending]) -> None:
        for attempt in (1, 2):
            conn: Any = self._idle.pop() if self._idle else self._pool.get_connection()
            read = 0
            try:
                # One write for the whole batch: redis-py sends each item of the list alone.
                conn.send_packed_command(
                    [b"".join([part for p in batch for part in _packed(conn, p.call)])],
                    check_health=False,
                )
                for pending in batch:
                    try:
                        pending.value = conn.read_response()
                        pending.ok = True
                    except NoScriptError:
                        pending.value = None  # loaded and run again below
                    except ResponseError as exc:
                        pending.value = exc
                    read += 1
                break
            except redis.ConnectionError:
                conn.disconnect()
                # A connection the server dropped (restart, failover) is healed once, as a
                # single call is; not once a reply was read: that part of the batch ran.
                if attempt == 2 or read:
                    raise
            except BaseException:
                # Replies left unread would answer the next batch: drop the connection.
                conn.disconnect()
                raise
            finally:
                self._idle.append(conn)
        for pending in batch:
            if not pending.ok and pending.value is None:
                # NOSCRIPT after a SCRIPT FLUSH or restart: redis-py's Script loads it again.
                script, keys, args = pending.call
                try:
                    pending.value = script(keys, args)
                    pending.ok = True
                except BaseException as exc:  # every waiter must hear the outcome
                    pending.value = exc


def _packed(conn: Any, call: Call) -> list[bytes]:
    script, keys, args = call
    return conn.pack_command("EVALSHA", script.sha, len(keys), *keys, *args)  # type: ignore[no-any-return]
