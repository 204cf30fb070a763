#!/usr/bin/env python3
"""Benchmark consumer for command projectors: reads events, acks every 1,000 and
every checkpoint, does nothing else. Parses only what it needs (the position)."""
import sys

out = sys.stdout
n = 0
last = None
for line in sys.stdin:
    if line.startswith('{"checkpoint"'):
        out.write('{"ack": %s}\n' % line[line.index(":") + 1:line.index("}")].strip())
        out.flush()
        continue
    n += 1
    if n % 1000 == 0:
        # {"position" : 1234, ...
        out.write('{"ack": %s}\n' % line[line.index(":") + 1:line.index(",")].strip())
        out.flush()
