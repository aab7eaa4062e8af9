"""A log keeps its beginning and its end: the keeper alone, then a container that floods its log on the real engine."""

import re
import tracemalloc

import pytest

from client import containers
from client.log_keeper import HeadAndTail, LogFollower
from client.site_config import CONTAINER_DEFAULTS, ContainerLimits
from tests.images import BASE_IMAGE, engine_or_fail

FLOOD_SCRIPT = """
import sys
out = sys.stdout.buffer
out.write(b"FIRST LINE: what the algorithm set out to do\\n")
piece = bytes(range(256)) * 256  # binary, no newlines, 64 KiB
for _ in range({pieces}):
    out.write(piece)
out.write(b"\\nLAST LINE: why it stopped\\n")
out.flush()
"""


def kept(stream, head, tail, piece_size):
    keeper = HeadAndTail(head, tail)
    for start in range(0, len(stream), piece_size):
        keeper.feed(stream[start:start + piece_size])
    return keeper


@pytest.mark.parametrize("piece_size", [1, 7, 100, 4096, 10_000])
def test_a_short_log_is_kept_byte_for_byte(tmp_path, piece_size):
    stream = bytes(range(256)) * 10
    keeper = kept(stream, 2000, 2000, piece_size)
    keeper.write_to(tmp_path / "log.txt")
    assert (tmp_path / "log.txt").read_bytes() == stream and keeper.dropped == 0


@pytest.mark.parametrize("piece_size", [1, 7, 100, 999, 4096, 10_000])
def test_a_long_log_keeps_its_head_and_tail_and_says_what_was_dropped(tmp_path, piece_size):
    stream = bytes(index % 251 for index in range(9_000))
    keeper = kept(stream, 1000, 1500, piece_size)
    keeper.write_to(tmp_path / "log.txt")
    head, note, tail = (tmp_path / "log.txt").read_bytes().partition(
        b"\n[site runner] 6500 bytes of the log dropped here (it kept the first 1000 and the last 1500)\n")
    assert note and head == stream[:1000] and tail == stream[-1500:]


def test_memory_stays_within_head_and_tail_whatever_comes():
    keeper = HeadAndTail(1024 ** 2, 1024 ** 2)
    piece = b"x" * 65536
    for _ in range(1600):  # 100 MiB
        keeper.feed(piece)
        assert keeper.kept <= 2 * 1024 ** 2
    assert keeper.seen == 100 * 1024 ** 2 and keeper.dropped == 98 * 1024 ** 2


def test_a_log_written_a_byte_at_a_time_costs_no_more_memory_than_its_bytes():
    """Docker hands a log over as the algorithm wrote it: a piece per write, one byte each if it likes."""
    tail_bytes = 256 * 1024
    keeper = HeadAndTail(1024, tail_bytes)
    tracemalloc.start()
    try:
        for _ in range(4 * tail_bytes):
            keeper.feed(b"x")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert keeper.kept == 1024 + tail_bytes
    assert peak < 4 * tail_bytes, f"{peak} bytes held for a tail of {tail_bytes}"


def test_trouble_is_said_at_the_end(tmp_path):
    keeper = kept(b"some output", 100, 100, 4)
    keeper.write_to(tmp_path / "log.txt", trouble="following the log broke (ReadTimeout)")
    assert (tmp_path / "log.txt").read_bytes() == b"some output\n[site runner] following the log broke (ReadTimeout)\n"


@pytest.fixture(scope="module")
def engine():
    return engine_or_fail()


def run_flood(engine, pieces):
    """A container as the runner makes them, printing a first line, pieces of 64 KiB of binary, a last line."""
    limits = ContainerLimits(**CONTAINER_DEFAULTS)
    return containers.create_contained(engine, BASE_IMAGE, [], {}, limits, {}, "none",
                                       ["python3", "-c", FLOOD_SCRIPT.format(pieces=pieces)])


def test_a_flood_far_past_what_docker_keeps_keeps_its_first_and_last_lines(engine, tmp_path):
    pieces = 1600  # 100 MiB: twice what Docker keeps of a container's log (containers.MAX_LOG_BYTES)
    container = run_flood(engine, pieces)
    try:
        follower = LogFollower(container, tmp_path / "log.txt", head_bytes=1024 ** 2, tail_bytes=1024 ** 2).start()
        container.start()
        assert container.wait(timeout=300)["StatusCode"] == 0
        follower.finish()
    finally:
        container.remove(force=True)
    log = (tmp_path / "log.txt").read_bytes()
    assert log.startswith(b"FIRST LINE: what the algorithm set out to do\n")
    assert log.endswith(b"\nLAST LINE: why it stopped\n")
    [dropped] = re.findall(rb"\n\[site runner\] (\d+) bytes of the log dropped here", log)
    printed = len(b"FIRST LINE: what the algorithm set out to do\n") + pieces * 65536 + len(b"\nLAST LINE: why it stopped\n")
    assert int(dropped) == printed - 2 * 1024 ** 2  # every byte seen: the follower kept up with the flood
    assert len(log) < 2 * 1024 ** 2 + 200


def test_a_container_that_ended_before_the_runner_looked_keeps_what_docker_holds(engine, tmp_path):
    container = run_flood(engine, 2)
    try:
        container.start()
        assert container.wait(timeout=60)["StatusCode"] == 0
        LogFollower(container, tmp_path / "log.txt").start().finish()  # a restarted runner's way
    finally:
        container.remove(force=True)
    log = (tmp_path / "log.txt").read_bytes()
    assert log.startswith(b"FIRST LINE") and log.endswith(b"LAST LINE: why it stopped\n")
    assert b"[site runner]" not in log


def test_a_container_that_prints_nothing_has_an_empty_log(engine, tmp_path):
    limits = ContainerLimits(**CONTAINER_DEFAULTS)
    container = containers.create_contained(engine, BASE_IMAGE, [], {}, limits, {}, "none", ["true"])
    try:
        follower = LogFollower(container, tmp_path / "log.txt").start()
        container.start()
        container.wait(timeout=60)
        follower.finish()
    finally:
        container.remove(force=True)
    assert (tmp_path / "log.txt").read_bytes() == b""
