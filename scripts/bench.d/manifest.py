#!/usr/bin/env python3
"""Manifests for scripts/bench, derived from the example projectors.toml.

  manifest.py sql SRC [NAME...]     [store] and the SQL projectors of SRC (command
                                    projectors dropped), only NAMEs when given
  manifest.py latency SRC           [store] of SRC (with its notify) and one projector
                                    `latency` recording each Ping event's delay
  manifest.py many SRC N [NAME...]  [store], the SQL projectors NAMEs of SRC, and N
                                    trivial from_now projectors bench_001...
  manifest.py partitioned SRC N NAME
                                    as `sql` with the one projector NAME, split into N
                                    partitions
  manifest.py table SRC TABLE [NAME...]
                                    as `sql`, over the events table TABLE without a
                                    transaction column (nor notify): the hole rule reads it

The text of the kept sections is copied verbatim, so the handlers are exactly the
example's.
"""
import re
import sys
import tomllib


def sections(text):
    """[(projector name or None, header, lines)] in file order; None for non-projector sections."""
    out = []
    cur = (None, None, [])
    for line in text.splitlines(keepends=True):
        m = re.match(r"^\s*\[\[?\s*([A-Za-z0-9_.\"]+)\s*\]\]?\s*(#.*)?$", line)
        if m:
            out.append(cur)
            key = m.group(1)
            parts = key.split(".")
            name = parts[1] if parts[0] == "projectors" and len(parts) >= 2 else None
            cur = (name, parts[0], [line])
        else:
            cur[2].append(line)
    out.append(cur)
    return out


def strip_comment_tail(lines):
    # Trailing comment/blank lines belong to the next section in the source.
    while lines and (lines[-1].strip() == "" or lines[-1].lstrip().startswith("#")):
        lines = lines[:-1]
    return lines


def keep(text, names, top=("store",)):
    parsed = tomllib.loads(text)
    sql = {n for n, p in parsed.get("projectors", {}).items() if "command" not in p}
    wanted = sql if names is None else set(names)
    missing = wanted - sql
    if missing:
        sys.exit(f"manifest.py: no SQL projector {sorted(missing)} in the source manifest")
    out = []
    for name, head, lines in sections(text):
        if head is None:
            continue
        if (name is None and head in top) or (name in wanted):
            out.extend(strip_comment_tail(lines))
            out.append("\n")
    return "".join(out)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    mode, src = sys.argv[1], sys.argv[2]
    text = open(src, encoding="utf-8").read()
    if mode == "sql":
        names = sys.argv[3:] or None
        sys.stdout.write(keep(text, names))
    elif mode == "latency":
        sys.stdout.write(keep(text, []))
        sys.stdout.write(
            '[projectors.latency]\n'
            'tables = ["bench_latency"]\n'
            '# clock_timestamp() is when the handler runs; :time (tstamp DEFAULT now()) is when the\n'
            '# inserting transaction started: each Ping INSERT is its own short transaction.\n'
            'on.Ping = "INSERT INTO bench_latency (position, delay) VALUES (:position, clock_timestamp() - :time)"\n'
        )
    elif mode == "table":
        table = sys.argv[3]
        out = keep(text, sys.argv[4:] or None)
        lines = []
        in_store = in_check = False
        for line in out.splitlines(keepends=True):
            if line.startswith("["):
                in_store = line.strip() == "[store]"
                # The checks read the example's events table: left out.
                in_check = line.startswith("[[")
            if in_check:
                continue
            if in_store and re.match(r"^\s*(transaction|notify)\s*=", line):
                continue
            if in_store and re.match(r"^\s*table\s*=", line):
                line = f'table = "{table}"\n'
            lines.append(line)
        sys.stdout.write("".join(lines))
    elif mode == "partitioned":
        n, name = int(sys.argv[3]), sys.argv[4]
        out = keep(text, [name])
        sys.stdout.write(out.replace(f"[projectors.{name}]\n", f"[projectors.{name}]\npartitions = {n}\n", 1))
    elif mode == "many":
        n = int(sys.argv[3])
        sys.stdout.write(keep(text, sys.argv[4:]))
        for i in range(1, n + 1):
            sys.stdout.write(
                f'[projectors.bench_{i:03d}]\nmode = "from_now"\non.BandCreated = "SELECT 1"\n\n'
            )
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
