"""The embedded broker: kombu's filesystem transport, each message written atomically.

kombu's own `_put` creates the message file and then writes it; its lock is advisory and the reader
does not take it. So a worker polling the folder can take a file the API has created but not yet
written: it moves the file away, fails to decode the empty payload (JSONDecodeError in the consumer
loop) and the message is gone. The run then waits for the reaper to publish it again
(BNLAB_REQUEUE_AFTER_S, two minutes by default). The integration suite caught it once, with the
worker polling every 0.05 s.

Here the message is written under a name the reader skips (it takes only `*.<queue>.msg`), then
renamed to kombu's own name. A rename within one folder is atomic, so a reader sees the whole
message or nothing. The exchange's binding table has the same flaw where kombu creates it (the
first queue bound: a publisher reading it then got an empty file and a JSONDecodeError; this
module's stress test caught it), so a new table is written whole under another name and linked
into place. Celery picks this class through `broker_transport` (see service/queue.py).

The worker's loop polls the folder, sleeping `polling_interval` between polls. While every
training process is busy it has no room for another message (acks_late, prefetch 1), so in a
grid each run's end waited out the rest of a sleep before the next message was taken. Here an ack
or a reject (a training process's task ending, in the pool's result thread) wakes the sleeping
loop at once.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from time import monotonic, monotonic_ns
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, virtual
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

_last_stamp = 0
_stamp_lock = threading.Lock()


def message_name(queue: str) -> str:
    """A message's file name, in kombu's filesystem transport's form (`<anything without a
    dot>.<queue>.msg`): the reader takes the files in sorted order, so the name leads with the
    monotonic clock in nanoseconds, 20 digits, strictly increasing within this process. kombu's own
    names lead with milliseconds: two messages published in the same millisecond (an experiment's
    runs, one after another) were then taken in the order of their random suffixes."""
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(_last_stamp + 1, monotonic_ns())
        stamp = _last_stamp
    return f"{stamp:020d}_{uuid.uuid4()}.{queue}.msg"


def write_whole(path: str, data: bytes, *, exclusive: bool = False) -> bool:
    """`data` into `path`, seen by a reader of its folder whole or not at all: written aside under a
    name readers skip, then moved into place. With `exclusive`, only if `path` does not exist yet
    (False if another process created it first). Nothing is left aside, whatever happens."""
    partial = os.path.join(os.path.dirname(path), f".{uuid.uuid4().hex}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(data)
        if exclusive:
            os.link(partial, path)  # unlike a rename, fails if the target exists
        else:
            os.replace(partial, path)
    except FileExistsError:
        if not exclusive:
            raise
        return False
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return True


class Channel(filesystem.Channel):
    # As kombu's filesystem channel declares it: publishing passes keyword arguments through.
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        try:
            path = os.path.join(self.data_folder_out, message_name(queue))
            write_whole(path, str_to_bytes(dumps(payload)))
        except OSError as exc:
            raise ChannelError(f"Cannot add a message to {self.data_folder_out!r}") from exc

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str | None, queue: str) -> None:
        # kombu's checked path of the exchange's table (absent from the kombu stubs mypy reads).
        table: Path = self._exchange_file(exchange)  # type: ignore[attr-defined]
        if not table.exists():
            self.control_folder.mkdir(exist_ok=True)
            entry = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
            try:
                if write_whole(str(table), str_to_bytes(dumps([entry])), exclusive=True):
                    return
            except OSError as exc:
                raise ChannelError(f"Cannot create {table}") from exc
        super()._queue_bind(exchange, routing_key, pattern, queue)  # the table exists: kombu's locked update

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple)
        self._wake_transport()

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue)
        self._wake_transport()

    def _wake_transport(self) -> None:
        # A task's ack comes from the pool's result thread; the transport's loop may be asleep.
        # (No transport once kombu has closed the channel.)
        if isinstance(self.connection, Transport):
            self.connection.wake()


class Transport(filesystem.Transport):
    Channel = Channel

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._room = threading.Event()

    def wake(self) -> None:
        self._room.set()

    def drain_events(self, connection: Any, timeout: float | None = None, **_: Any) -> None:
        """kombu's virtual transport's loop (take a message, or sleep `polling_interval` and try
        again until `timeout`), with the sleep cut short by an ack or a reject."""
        assert self.cycle is not None  # made with the transport (kombu's stubs allow None)
        started = monotonic()
        interval = self.polling_interval
        if timeout and interval and interval > timeout:
            interval = timeout
        while True:
            self._room.clear()  # before the try: an ack during it leaves the event set
            try:
                self.cycle.get(self._deliver, timeout=timeout)
            except virtual.Empty:
                if timeout is not None and monotonic() - started >= timeout:
                    raise TimeoutError from None  # socket.timeout, as kombu raises
                if interval is not None:
                    self._room.wait(interval)
            else:
                return
