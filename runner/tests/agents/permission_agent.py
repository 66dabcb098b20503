#!/usr/bin/env python3
"""An agentbox agent that asks before it writes: the README's example, used by the tests.

It reports what it is doing as an `agent` event, asks permission to append the prompt to
note.txt in its session directory, waits for the answer, and acts on it. The prompt comes on
stdin; a word `asks=N` in it makes it ask N times, `garbage` makes it first write lines the
runner must refuse.
"""
import json
import os
import sys

events = os.fdopen(int(os.environ["AGENTBOX_EVENTS_FD"]), "w", buffering=1)
replies = os.fdopen(int(os.environ["AGENTBOX_REPLIES_FD"]), "r")


def send(message):
    events.write(json.dumps(message) + "\n")


def ask(permission_id, title, kind):
    """Sends a permission request and blocks until the runner writes its reply."""
    send({"type": "permission_request", "id": permission_id, "title": title,
          "toolCall": {"kind": kind, "title": title}})
    for line in replies:
        reply = json.loads(line)
        if reply.get("type") == "permission_reply" and reply.get("id") == permission_id:
            return reply["reply"]  # "once", "always" or "reject"
    return "reject"  # the runner went away


prompt = sys.stdin.read().strip() or "hello"
words = prompt.split()
asks = next((int(w[5:]) for w in words if w.startswith("asks=")), 1)
if "garbage" in words:
    events.write("this is not json\n")
    send({"type": "no-such-type"})
    send({"type": "permission_request", "title": "no id"})
    events.write("x" * (2 << 20) + "\n")
    # Invalid UTF-8, and a two-byte char across the runner's 1024-byte quote limit.
    events.flush()
    events.buffer.write(b"\xff" * 400 + b"\n")
    events.buffer.write(b"a" * 1023 + "\u00e9".encode() + b"\n")
    events.buffer.flush()
send({"type": "event", "name": "thinking", "data": {"prompt": prompt}})
note = os.path.join(os.environ.get("AGENTBOX_SESSION_DIR", "."), "note.txt")
for n in range(1, asks + 1):
    reply = ask(f"write-{n}", f"Append to {note}", "edit")
    if reply in ("once", "always"):
        with open(note, "a") as f:
            f.write(prompt + "\n")
        print(f"{n}: wrote {note} ({reply})", flush=True)
    else:
        print(f"{n}: not allowed ({reply})", flush=True)
