"""Ids: strictly increasing, well-formed, and never the same random bits in two processes."""

from __future__ import annotations

import os

from xml_pipeline.ids import IdFactory, is_id


def test_ids_are_well_formed_and_strictly_increasing_within_a_millisecond() -> None:
    factory = IdFactory(clock=lambda: 1.0)
    made = [factory.new() for _ in range(2000)]  # more than one pool of randomness
    assert all(is_id(text) for text in made)
    assert made == sorted(made) and len(set(made)) == len(made)


def test_a_forked_child_draws_other_random_bits_than_its_parent() -> None:
    # The randomness is read from the OS in batches; a child that kept its parent's batch
    # would make the very ids its parent makes next.
    IdFactory().new()  # the pool is filled, and partly used
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, IdFactory(clock=lambda: 1.0).new().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert is_id(child) and child != IdFactory(clock=lambda: 1.0).new()
