"""On resume, the run's log is trimmed to the resumed step, and only a regular file is read (helper-80, stop 37).

``train_log.jsonl`` replaced by a link to /dev/zero made a resume read until the machine was out of memory (21.7 GB,
then killed); a named pipe blocked it for ever."""

from __future__ import annotations

import json
import os
import threading

from bca_deploy.training.trainer import _trim_log


def test_the_log_is_trimmed_to_the_resumed_step(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    _trim_log(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


def test_a_log_that_is_not_a_regular_file_is_left_unread(tmp_path):
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    done = []
    worker = threading.Thread(target=lambda: (_trim_log(zero, 1), _trim_log(fifo, 1), done.append(True)), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert done == [True]  # returned at once: neither read from /dev/zero nor waited on the pipe
    assert zero.is_symlink() and os.readlink(zero) == "/dev/zero"


def test_trimming_a_small_log_sets_aside_no_more_than_it_reads(tmp_path):
    """The log was read with handle.read(1 GiB + 1), which sets aside the whole gigabyte before reading a 200-byte
    file (tracemalloc saw it; a container without memory overcommit refuses it). It is read in pieces now
    (errors.read_at_most), as config.json files are."""
    import tracemalloc

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    tracemalloc.start()
    try:
        _trim_log(log, 2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak / 2**20:.0f} MiB set aside to trim a {log.stat().st_size}-byte log"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
