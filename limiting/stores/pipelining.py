"""How script calls reach one server: straight on a connection of their own, and under gevent
several concurrent requests' calls sharing one round trip.

Every decision is one EVALSHA, and on a small machine the round trip costs more than the
script. Two things are cut here. First, redis-py's generic command path (retry wrapper,
observability hooks, the pool's per-call checks) costs as much CPU as the packing and parsing
themselves; a call goes out on a connection this thread keeps, and comes back through
redis-py's own parser and errors. Second, a worker that sleeps until the reply pays about as
much CPU to wake up as the call itself (measured: a 50 µs sleep adds ~40 µs of CPU to a
request). Under gevent a worker holds many requests: the first one that reaches the store
yields once, so every other request that is ready to run reaches its own call too, then one
write carries all of them and the replies are read in order. Each call is still its own
atomic script; only the trip is shared (Valkey runs them one after another, as it would have).

The budget is unchanged: replies are awaited on an OS socket with the store's timeout, so a
slow store fails the calls of that trip after the budget and nothing else.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError, ResponseError

from ..metrics import STORE_ROUND_TRIPS, STORE_SCRIPT_CALLS, count

Call = tuple[Script, list[str], Sequence[Any]]


class _Pending:
    """One call on its way: its result or error, and the greenlet waiting for it."""

    __slots__ = ("call", "ok", "value", "waiter")

    def __init__(self, call: Call, waiter: Any = None) -> None:
        self.call = call
        self.waiter = waiter
        self.ok = False
        self.value: Any = None

    def outcome(self) -> Any:
        """The reply, or the error raised in the caller's own frame."""
        if self.ok:
            return self.value
        raise self.value


class Direct:
    """One call, one round trip, on a connection this thread keeps (threads, sync workers)."""

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._local = threading.local()
        _CALLERS.add(self)

    def forget_connections(self) -> None:
        """After a fork: a socket the parent holds must not carry this process's calls."""
        self._local = threading.local()

    def call(self, script: Script, keys: list[str], args: Sequence[Any]) -> Any:
        pending = _Pending((script, keys, args))
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._pool.get_connection()
        _send_and_read(conn, [pending])
        return pending.outcome()


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
        # Connections kept between trips: a trip always reads every reply or drops the
        # connection, so the pool's poll for stray data would be a syscall for nothing.
        self._idle: list[Any] = []
        _CALLERS.add(self)

    def forget_connections(self) -> None:
        self._idle = []

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
        return pending.outcome()

    def _run(self, batch: list[_Pending]) -> None:
        """Send the batch and answer every call in it; never raises."""
        count(STORE_ROUND_TRIPS)
        count(STORE_SCRIPT_CALLS, len(batch))
        try:
            conn = self._idle.pop() if self._idle else self._pool.get_connection()
        except BaseException as exc:  # no connection to be had: every caller hears why
            for pending in batch:
                pending.value = exc
        else:
            try:
                _send_and_read(conn, batch)
            finally:
                self._idle.append(conn)
        # A waiter may only be switched to from the hub: the waiting requests resume in turn
        # once this one yields.
        run_callback = self._hub.loop.run_callback
        for pending in batch[1:]:
            run_callback(pending.waiter.switch, None)


_CALLERS: weakref.WeakSet[Direct | Pipeliner] = weakref.WeakSet()


def _after_fork() -> None:
    for caller in list(_CALLERS):
        caller.forget_connections()


# An app used before gunicorn forks (--preload) would otherwise share the master's sockets
# with every worker; checking the pid on each call, as redis-py's pool does, costs a syscall.
os.register_at_fork(after_in_child=_after_fork)


def _send_and_read(conn: Any, batch: list[_Pending]) -> None:
    """Answer every call of the batch (a value or an error on each); never raises."""
    try:
        _trip(conn, batch)
    except BaseException as exc:  # every caller must hear the outcome
        for pending in batch:
            if not pending.ok and pending.value is None:
                pending.value = exc
        return
    for pending in batch:
        if not pending.ok and pending.value is None:
            # NOSCRIPT after a SCRIPT FLUSH or restart: redis-py's Script loads it again; and
            # once more when another flush came between its load and its call (NOSCRIPT: the
            # script did not run, so nothing was charged twice).
            script, keys, args = pending.call
            for _ in (1, 2):
                try:
                    pending.value = script(keys, args)
                    pending.ok = True
                    break
                except NoScriptError as exc:
                    pending.value = exc
                except BaseException as exc:  # the caller maps it, as any store error
                    pending.value = exc
                    break


def _trip(conn: Any, batch: list[_Pending]) -> None:
    packed = packed_batch(conn, [p.call for p in batch])
    for attempt in (1, 2):
        read = 0
        try:
            # Connect as the pool would: a Sentinel connection asks where the master is now
            # (send_packed_command would reconnect to the address it had).
            conn.connect()
            conn.send_packed_command(packed, check_health=False)
            for pending in batch:
                try:
                    pending.value = conn.read_response()
                    pending.ok = True
                except NoScriptError:
                    pending.value = None  # loaded and run again by the caller
                except ResponseError as exc:
                    pending.value = exc
                read += 1
            return
        except redis.ConnectionError:
            conn.disconnect()
            # A connection the server dropped (restart, failover) is healed once, as redis-py
            # heals a single call; not once a reply was read: that part of the batch ran.
            if attempt == 2 or read:
                raise
        except BaseException:
            # Replies left unread would answer the next trip: drop the connection.
            conn.disconnect()
            raise


def packed_batch(conn: Any, calls: Sequence[Call]) -> list[bytes]:
    """The EVALSHA calls packed for one write, through redis-py's public connection API.

    What this module relies on from redis-py (pinned 8.1.0; tests/test_private_apis.py checks
    each): ``pack_commands`` packs several commands (as its pipelines do) into chunks that
    ``send_packed_command(chunks, check_health=False)`` writes in order, one ``sendall`` a
    chunk; ``connect()`` returns at once when connected; ``read_response()`` raises the
    server's error (``NoScriptError`` for NOSCRIPT) instead of returning it.
    """
    chunks: list[bytes] = conn.pack_commands(
        [("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args in calls])
    # One write for the whole batch: redis-py cuts it into chunks of ~6 kB, one syscall each.
    return chunks if len(chunks) == 1 else [b"".join(chunks)]
