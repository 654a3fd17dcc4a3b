"""Tests for stream.buffers: newest-wins and lossless hand-off, END_OF_STREAM, stop."""

from __future__ import annotations

import threading
import time

import pytest

from stream.buffers import (
    END_OF_STREAM,
    BlockingBuffer,
    Empty,
    LatestFrameBuffer,
    make_buffer,
)


def consume(buffer, delay_s: float) -> list:
    """Items taken from `buffer`, one every `delay_s`, up to END_OF_STREAM."""
    got = []
    while (item := buffer.get(timeout=2.0)) is not END_OF_STREAM:
        got.append(item)
        time.sleep(delay_s)
    return got


def test_given_latest_buffer_and_slow_consumer_when_100_fast_puts_then_newest_wins_drops_counted():
    buffer = LatestFrameBuffer()
    waiting = []

    def produce() -> None:
        for i in range(100):
            buffer.put(i)
            waiting.append(len(buffer))
            time.sleep(0.001)
        buffer.put(END_OF_STREAM)

    producer = threading.Thread(target=produce)
    producer.start()
    got = consume(buffer, delay_s=0.01)
    producer.join(timeout=2.0)

    assert got == sorted(set(got)), "indices must strictly increase"
    assert got[-1] == 99
    assert 0 < len(got) < 100
    assert buffer.dropped == 100 - len(got)
    assert max(waiting) == 1


def test_given_latest_buffer_when_ended_then_last_item_still_delivered_and_later_puts_ignored():
    buffer = LatestFrameBuffer()
    buffer.put("a")
    buffer.put("b")

    assert buffer.put(END_OF_STREAM)
    assert not buffer.put("c")
    assert buffer.get(timeout=0.1) == "b"
    assert buffer.get(timeout=0.1) is END_OF_STREAM
    assert buffer.get(timeout=0.1) is END_OF_STREAM
    assert buffer.dropped == 1


def test_given_empty_latest_buffer_when_get_times_out_then_raises_empty():
    start = time.monotonic()
    with pytest.raises(Empty):
        LatestFrameBuffer().get(timeout=0.05)
    assert time.monotonic() - start < 1.0


def test_given_blocking_buffer_and_slow_consumer_when_producing_then_all_items_arrive_in_order():
    buffer = BlockingBuffer(maxsize=4)
    sizes = []

    def produce() -> None:
        for i in range(100):
            assert buffer.put(i)
            sizes.append(len(buffer))
        buffer.put(END_OF_STREAM)

    producer = threading.Thread(target=produce)
    producer.start()
    got = consume(buffer, delay_s=0.001)
    producer.join(timeout=2.0)

    assert got == list(range(100))
    assert buffer.dropped == 0
    assert max(sizes) <= 4


def test_given_full_blocking_buffer_when_stop_event_set_then_blocked_put_returns_promptly():
    stop = threading.Event()
    buffer = BlockingBuffer(maxsize=1, stop_event=stop)
    buffer.put(0)
    result = []
    producer = threading.Thread(target=lambda: result.append(buffer.put(1)))
    producer.start()
    time.sleep(0.1)
    assert producer.is_alive(), "put must wait while the buffer is full"

    set_at = time.monotonic()
    stop.set()
    producer.join(timeout=1.0)

    assert not producer.is_alive()
    assert time.monotonic() - set_at < 0.5
    assert result == [False]


def test_given_full_blocking_buffer_when_put_times_out_then_returns_false():
    buffer = BlockingBuffer(maxsize=1)
    buffer.put(0)
    start = time.monotonic()

    assert not buffer.put(1, timeout=0.1)
    assert 0.09 < time.monotonic() - start < 1.0
    assert len(buffer) == 1


def test_given_full_blocking_buffer_when_end_of_stream_put_then_it_does_not_block_and_comes_last():
    buffer = BlockingBuffer(maxsize=1)
    buffer.put(0)

    assert buffer.put(END_OF_STREAM, timeout=0.01)
    assert buffer.get(timeout=0.1) == 0
    assert buffer.get(timeout=0.1) is END_OF_STREAM


def test_given_bad_maxsize_when_creating_blocking_buffer_then_value_error():
    with pytest.raises(ValueError, match="maxsize must be at least 1, but got 0"):
        BlockingBuffer(maxsize=0)


def test_given_source_kind_when_making_buffer_then_files_lossless_and_live_newest_wins():
    stop = threading.Event()
    file_buffer = make_buffer(is_file=True, maxsize=8, stop_event=stop)
    live_buffer = make_buffer(is_file=False, maxsize=8)

    assert isinstance(file_buffer, BlockingBuffer)
    assert file_buffer.maxsize == 8 and file_buffer.stop_event is stop
    assert isinstance(live_buffer, LatestFrameBuffer)
