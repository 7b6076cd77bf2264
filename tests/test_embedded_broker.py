"""The embedded broker writes each message atomically: a worker polling the folder never takes a
message the API has created but not yet written (kombu's own transport lost such messages)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from service import embedded_broker
from service.config import Settings
from service.queue import EMBEDDED_TRANSPORT, broker_transport_options, celery_config

QUEUE = "bnlab-test"


def test_a_message_gets_its_name_only_once_it_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    real_replace = os.replace

    def replace(source: str, target: str) -> None:
        # The moment before the message takes its name: only the partial file is there, complete.
        seen.append(sorted(os.listdir(tmp_path)))
        assert Path(source).read_bytes() == b'{"whole": true}'
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    embedded_broker.write_whole(str(tmp_path / f"1_x.{QUEUE}.msg"), b'{"whole": true}')
    (listing,) = seen
    assert len(listing) == 1
    assert listing[0].endswith(".partial")
    assert not listing[0].partition(".")[2].endswith(f"{QUEUE}.msg")  # the reader's filter skips it
    assert os.listdir(tmp_path) == [f"1_x.{QUEUE}.msg"]


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(source: str, target: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        embedded_broker.write_whole(str(tmp_path / f"1_x.{QUEUE}.msg"), b"{}")
    assert os.listdir(tmp_path) == []


def test_an_exchange_table_is_created_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # kombu created the binding table empty and then wrote it; a publisher reading it in between
    # failed with a JSONDecodeError. Here the table appears, by a link, only once written.
    options = broker_transport_options(Settings(data_dir=tmp_path))
    control = Path(options["control_folder"])
    linked: list[str] = []
    real_link = os.link

    def link(source: str, target: str) -> None:
        assert not Path(target).exists()
        linked.append(Path(source).read_text())
        real_link(source, target)

    monkeypatch.setattr(os, "link", link)
    with Connection("filesystem://", transport=EMBEDDED_TRANSPORT, transport_options=options) as conn:
        channel = conn.default_channel
        channel._queue_bind("bnlab-exchange", "key", None, QUEUE)  # the first binding creates the table
        channel._queue_bind("bnlab-exchange", "other", None, "other-queue")  # kombu's locked update
        table = channel.get_table("bnlab-exchange")
    assert linked == ['[["key", "", "bnlab-test"]]']
    assert [(q.routing_key, q.queue) for q in table] == [("other", "other-queue"), ("key", QUEUE)]
    assert sorted(p.name for p in control.iterdir()) == ["bnlab-exchange.exchange"]  # no partial left


def test_the_api_and_the_workers_use_it_for_the_embedded_broker_only(tmp_path: Path) -> None:
    assert celery_config(Settings(data_dir=tmp_path))["broker_transport"] == EMBEDDED_TRANSPORT
    redis = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0")
    assert celery_config(redis)["broker_transport"] is None


def test_messages_published_while_a_consumer_polls_all_arrive_whole(tmp_path: Path) -> None:
    # A bounded stress run of the race kombu's own _put loses: one thread publishes while another
    # takes messages as fast as it can; every message arrives, decoded, exactly once.
    options = broker_transport_options(Settings(data_dir=tmp_path)) | {"polling_interval": 0.001}
    count, received, errors = 1000, [], []

    def connection() -> Connection:
        return Connection("filesystem://", transport=EMBEDDED_TRANSPORT, transport_options=options)

    def consume() -> None:
        with connection() as conn:
            queue = conn.SimpleQueue(QUEUE)
            try:
                while len(received) < count:
                    message = queue.get(timeout=10)
                    received.append(message.payload["i"])
                    message.ack()
            except Exception as exc:  # a decode error here is the bug under test
                errors.append(exc)
            finally:
                queue.close()

    # Bound once before the threads start: two connections in one process share kombu's in-memory
    # record of bindings, so the second would skip writing the table and could publish before the
    # first has (an artefact of the test; the API and the workers are separate processes).
    with connection() as conn:
        conn.SimpleQueue(QUEUE).close()
    consumer = threading.Thread(target=consume)
    consumer.start()
    with connection() as conn:
        queue = conn.SimpleQueue(QUEUE)
        for i in range(count):
            payload: dict[str, Any] = {"i": i, "padding": "x" * 20_000}  # a write that takes a while
            queue.put(payload)
        queue.close()
    consumer.join(timeout=60)
    assert not errors, errors
    assert sorted(received) == list(range(count))


def test_an_exclusive_write_never_replaces_a_file_that_exists(tmp_path: Path) -> None:
    table = tmp_path / "bnlab.exchange"
    assert embedded_broker.write_whole(str(table), b"[1]", exclusive=True)
    assert not embedded_broker.write_whole(str(table), b"[2]", exclusive=True)
    assert table.read_bytes() == b"[1]"
    assert os.listdir(tmp_path) == ["bnlab.exchange"]  # no partial file left behind


def test_messages_published_in_a_burst_are_taken_in_the_order_they_were_published(tmp_path: Path) -> None:
    # An experiment publishes its runs one after another, many within a millisecond: a name that
    # led with milliseconds left their order to the random part of the name.
    options = broker_transport_options(Settings(data_dir=tmp_path))
    with Connection("filesystem://", transport=EMBEDDED_TRANSPORT, transport_options=options) as conn:
        # A queue of its own: kombu remembers bindings per process, and would not write this folder's
        # table for a queue another test bound (an artefact of tests sharing a process).
        queue = conn.SimpleQueue(f"{QUEUE}-burst")
        for i in range(200):
            queue.put({"i": i})
        received = []
        for _ in range(200):
            message = queue.get(timeout=5)
            received.append(message.payload["i"])
            message.ack()
        queue.close()
    assert received == list(range(200))
    names = [embedded_broker.message_name(QUEUE) for _ in range(10_000)]
    assert names == sorted(names)
    assert len(set(names)) == len(names)


def test_an_ack_wakes_the_consumer_for_the_next_message_at_once(tmp_path: Path) -> None:
    # A worker whose training processes are all busy (prefetch 1, acks_late) has no room for the next
    # message; a task's end acks its message from the pool's result thread. The poll loop, sleeping
    # `polling_interval` (a long one here), must take the next message on that ack, not after its sleep.
    options = broker_transport_options(Settings(data_dir=tmp_path)) | {"polling_interval": 3.0}
    with Connection("filesystem://", transport=EMBEDDED_TRANSPORT, transport_options=options) as conn:
        queue = conn.SimpleQueue(f"{QUEUE}-handover")  # a queue of its own, as above
        queue.consumer.qos(prefetch_count=1)
        queue.put({"i": 0})
        queue.put({"i": 1})
        first = queue.get(timeout=5)
        acked_at: list[float] = []

        def end_the_task() -> None:
            time.sleep(0.3)  # the loop is asleep by now: no room for the second message
            acked_at.append(time.monotonic())
            first.ack()

        ender = threading.Thread(target=end_the_task)
        ender.start()
        second = queue.get(timeout=10)
        taken_at = time.monotonic()
        ender.join()
        second.ack()
        queue.close()
    assert second.payload == {"i": 1}
    assert taken_at - acked_at[0] < 1.0  # 3 s, the rest of the sleep, before
