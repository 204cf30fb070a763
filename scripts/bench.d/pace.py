#!/usr/bin/env python3
"""Prints INSERT statements for psql at a steady rate (scripts/bench, play delay).

  pace.py RATE SECONDS ROWS   e.g. 2000 20 10: a 10-row INSERT of `Ping` events every 5 ms
                              for 20 s, each its own (autocommit) transaction

Pipe into ONE psql session: `pace.py 2000 20 10 | psql -X -q`. The schedule is absolute
(no drift); if psql falls behind, the statements queue in the pipe and the achieved
rate (measured from the events' tstamp) is lower. psql's \timing reports what each
INSERT (with its commit) took.
"""
import sys
import time


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    rate, seconds, rows = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    interval = rows / rate
    count = int(round(seconds / interval))
    stmt = (
        "INSERT INTO events (aggregate_id, aggregate_name, name, data) "
        "SELECT gen_random_uuid(), 'Bench', 'Ping', '{}'::jsonb FROM generate_series(1, %d);\n" % rows
    )
    out = sys.stdout
    # psql prints each statement's time (an autocommit INSERT: insert and commit) as "Time: x ms".
    out.write("\\timing on\n")
    start = time.monotonic()
    for i in range(count):
        target = start + i * interval
        delay = target - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        out.write(stmt)
        out.flush()


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:
        sys.exit(1)
