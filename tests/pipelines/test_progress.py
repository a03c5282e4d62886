"""The operator's progress line: shards done/total, samples/s, kept, rejected, ETA, on a timer."""

from __future__ import annotations

import logging
import re
import time

from pipelines.progress import Progress


def test_line_counts_and_eta_and_the_timer_logs_without_records(caplog):
    p = Progress(total_shards=10, done_before=2, interval_s=0.05)
    assert "shards 2/10 (20%)" in p.line() and "ETA ?" in p.line()
    p.started -= 20.0  # 20 s into the run
    p.record({"kept": 30, "rejected": 2, "node": "a"})
    p.record({"kept": 28, "rejected": 4, "node": "b"})
    line = p.line()
    assert "shards 4/10 (40%)" in line and "kept 58, rejected 6" in line
    assert re.search(r"3\.\d\d samples/s", line)  # 64 rows in ~20 s
    assert "ETA 1m00s" in line  # 6 shards left at 2 shards per 20 s
    assert p.shards_per_node == {"a": 1, "b": 1}
    with caplog.at_level(logging.INFO, logger="segfactory.progress"):
        p.start()
        time.sleep(0.3)  # no record arrives: the line still comes every interval
        p.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "segfactory.progress"]
    assert len(lines) >= 3 and all(m.startswith("progress: shards 4/10") for m in lines)
