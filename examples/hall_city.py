#!/usr/bin/env python3
"""A command projector that maintains a table through psql: which city each dance hall is in.

It keeps one `psql` process open (DATABASE_URL, inherited from projectionist) and
writes an idempotent upsert per DanceHallCreated event to it. At each checkpoint it
asks psql to echo a marker: psql runs statements in order, so when the marker comes
back every statement before it has been executed, and the checkpoint is acknowledged.

Values are passed to psql as dollar-quoted literals with a tag that cannot occur in
them, so event data never becomes SQL.
"""
import json
import os
import secrets
import subprocess
import sys


def literal(value):
    """A dollar-quoted SQL literal (or NULL) that no value can break out of."""
    if value is None:
        return "NULL"
    text = str(value)
    tag = "v"
    while f"${tag}$" in text:
        tag = "v" + secrets.token_hex(4)
    return f"${tag}${text}${tag}$"


def main():
    psql = subprocess.Popen(
        ["psql", os.environ["DATABASE_URL"], "-X", "-q", "-v", "ON_ERROR_STOP=1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    for line in sys.stdin:
        msg = json.loads(line)
        if "checkpoint" in msg:
            marker = f"checkpoint {msg['checkpoint']}"
            psql.stdin.write(f"\\echo '{marker}'\n")
            psql.stdin.flush()
            reply = psql.stdout.readline().strip()
            if reply != marker:
                print(f"psql stopped (said {reply!r})", file=sys.stderr)
                return 1  # projectionist breaks the projector at the first unacknowledged event
            print(json.dumps({"ack": msg["checkpoint"]}), flush=True)
            continue
        if msg["type"] != "DanceHallCreated":
            continue
        data = msg["data"]
        psql.stdin.write(
            "INSERT INTO hall_city (dance_hall, name, city, position) VALUES "
            f"({literal(msg['stream'])}::uuid, {literal(data.get('name'))}, {literal(data.get('city'))}, {msg['position']}) "
            "ON CONFLICT (dance_hall) DO UPDATE SET name = EXCLUDED.name, city = EXCLUDED.city, position = EXCLUDED.position;\n"
        )
    psql.stdin.close()
    return psql.wait()


if __name__ == "__main__":
    sys.exit(main())
