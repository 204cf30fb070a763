#!/usr/bin/env python3
"""A side-effecting command projector: a welcome email for every new user.

projectionist runs it with the `from_now` mode, so only users who register after
its release get an email. It reads one JSON event per line on stdin and answers
on stdout (see the README, "Writing a command projector"):

  {"position": 41, "type": "UserRegistered", "data": {...}, ...}   -> send the email
  {"checkpoint": 41}                                                -> {"ack": 41}

Delivery is at least once: after a crash, events after the last acknowledged
checkpoint come again. The event's `position` is the idempotency key: an email
whose position is already in the outbox is not sent twice.

"Sending" appends a line to the outbox file ($WELCOME_EMAIL_OUTBOX, default
./welcome_email_outbox.jsonl), fsynced before the ack.
"""
import json
import os
import sys

OUTBOX = os.environ.get("WELCOME_EMAIL_OUTBOX", "welcome_email_outbox.jsonl")


def already_sent():
    """Positions of the emails already sent: the idempotency keys."""
    sent = set()
    try:
        with open(OUTBOX) as f:
            for line in f:
                try:
                    sent.add(json.loads(line)["position"])
                except (ValueError, KeyError):
                    pass  # a torn last line from a crash: that email is sent again
    except FileNotFoundError:
        pass
    return sent


def main():
    sent = already_sent()
    outbox = open(OUTBOX, "a")
    for line in sys.stdin:
        msg = json.loads(line)
        if "checkpoint" in msg:
            outbox.flush()
            os.fsync(outbox.fileno())
            print(json.dumps({"ack": msg["checkpoint"]}), flush=True)
            continue
        position = msg["position"]
        if position in sent:
            continue  # delivered again after a crash: sent already
        data = msg.get("data") or {}
        email = data.get("email")
        if not email:
            # Tell projectionist which event failed; it stops this projector there.
            print(json.dumps({"error": "UserRegistered without an email", "position": position}), flush=True)
            return 0
        outbox.write(json.dumps({"position": position, "to": email, "subject": "Welcome to dancefinder!"}) + "\n")
        sent.add(position)
        # Logs go to stderr: stdout is the protocol.
        print(f"welcome email to {email} (event {position})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
