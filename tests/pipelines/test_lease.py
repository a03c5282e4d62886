"""The output's lease: one generate writes a dataset at a time; a dead holder's lease is taken."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import pytest

from core import storage
from pipelines.lease import LEASE, Lease, LeaseHeld
from segfactory.cli import main

CONFIG = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "seggen-toy.yaml"


def holder(tmp_path: Path, **fields) -> None:
    base = {"host": "other-host", "pid": 4242, "run_id": "abc123", "started": time.time() - 60,
            "heartbeat": time.time(), "expires": time.time() + 300}
    (tmp_path / LEASE).write_text(json.dumps({**base, **fields}))


def test_a_live_lease_stops_a_second_run_naming_the_holder(tmp_path):
    first = Lease(storage.resolve(tmp_path), ttl_s=60).acquire()
    try:
        lease = json.loads((tmp_path / LEASE).read_text())
        assert lease["run_id"] == first.me["run_id"] and lease["expires"] > time.time() + 50
        with pytest.raises(LeaseHeld, match=rf"{socket.gethostname()} pid \d+ \(run {first.me['run_id']}"):
            Lease(storage.resolve(tmp_path), ttl_s=60).acquire()
    finally:
        first.release()
    assert not (tmp_path / LEASE).exists()


@pytest.mark.parametrize("fields,why", [({"expires": time.time() - 5}, "expired"),
                                        ({"host": socket.gethostname(), "pid": 2**22 + 7}, "process is gone")])
def test_a_dead_holders_lease_is_taken_over_with_a_warning(tmp_path, caplog, fields, why):
    holder(tmp_path, **fields)
    with caplog.at_level(logging.WARNING):
        lease = Lease(storage.resolve(tmp_path), ttl_s=60).acquire()
    lease.release()
    assert f"taking over the lease of {fields.get('host', 'other-host')}" in caplog.text and why in caplog.text


def test_generate_on_a_leased_output_exits_2_in_one_line(tmp_path, toy_source, capsys):
    (tmp_path / "out").mkdir()
    holder(tmp_path / "out", host="node-7")
    code = main(["generate", "--config", str(CONFIG), f"source.path={toy_source}", f"output.path={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "another generate is writing there: node-7 pid 4242 (run abc123" in err
