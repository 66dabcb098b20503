#!/usr/bin/env python3
"""The published AgentTier Python SDK (agenttier==0.8.1) against a real agentbox control plane.

Run by controlplane/tests/agenttier.rs, which starts the control plane (local backend) and
passes AGENTBOX_URL and AGENTTIER_API_KEY. Every SDK method agentbox serves is called through
the sync client, then through the async one; the methods agentbox does not serve must fail with
501. Prints one line per check and `ok: N checks`; any failed check raises (exit code 1).
"""
import asyncio
import inspect
import io
import os
import sys
import tempfile
import time
import zipfile

import agenttier
from agenttier import AgentTierClient, AsyncAgentTierClient
from agenttier.auth import APIKeyAuth
from agenttier.exceptions import APIError, ConflictError, NotFoundError
from agenttier.models import SandboxPhase

URL = os.environ["AGENTBOX_URL"]
KEY = os.environ["AGENTTIER_API_KEY"]
# The runner's --grace of the `cap1` template (the Rust side writes the templates file).
GRACE = float(os.environ.get("AGENTBOX_GRACE_SECONDS", "3"))

# The agent every invoke runs: its behaviour is picked by the prompt.
AGENT = rb'''
import os, sys, time
prompts = [a[len("--prompt="):] for a in sys.argv[1:] if a.startswith("--prompt=")]
mode = prompts[0] if prompts else sys.stdin.read().strip()
out = sys.stdout.buffer
if mode == "two-flushes":
    out.write(b"Thinking..."); out.flush(); time.sleep(0.3); out.write(b" done\n")
elif mode == "invalid-utf8":
    out.write(b"bad \xff line\n")
elif mode.startswith("exit "):
    out.write(b"exiting\n"); out.flush(); sys.exit(int(mode[5:]))
elif mode == "streams":
    out.write(b"o1\n"); out.flush()
    sys.stderr.write("e1\n"); sys.stderr.flush()
    out.write(b"o2\n")
elif mode == "sleep":
    with open(os.path.join(os.environ["AGENTBOX_WORKSPACE"], "sleeper.pid"), "w") as f:
        f.write(str(os.getpid()))
    out.write(b"ready\n"); out.flush()
    time.sleep(1000)
else:
    out.write(("hello " + mode + "\n").encode())
'''

checks = 0


def check(name, cond, detail=""):
    global checks
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    checks += 1
    print(f"ok {checks} {name}", flush=True)


async def call(value):
    """Awaits what the async client returns; passes the sync client's results through."""
    if inspect.isawaitable(value):
        return await value
    return value


async def events_until(stream, pred):
    """Reads events of a sync or async invoke_stream until `pred`; returns them."""
    seen = []
    if hasattr(stream, "__anext__"):
        async for ev in stream:
            seen.append(ev)
            if pred(ev):
                break
    else:
        for ev in stream:
            seen.append(ev)
            if pred(ev):
                break
    return seen


async def close(stream):
    if hasattr(stream, "aclose"):
        await stream.aclose()
    else:
        stream.close()


async def expect_error(name, cls, awaitable_or_fn, status=None):
    try:
        value = awaitable_or_fn() if callable(awaitable_or_fn) else awaitable_or_fn
        await call(value)
    except cls as e:
        if status is not None:
            check(name, getattr(e, "status_code", None) == status, f"{e!r}")
        else:
            check(name, True)
        return e
    raise AssertionError(f"{name}: no {cls.__name__} raised")


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False


async def run(client, tag):
    """Every served SDK method through `client` (sync or async); names end in `tag`."""
    p = f"[{tag}] "

    # Client-level methods.
    me = await call(client.current_user())
    check(p + "current_user", bool(me.sub), me)
    templates = await call(client.list_templates())
    names = {t.name for t in templates}
    check(p + "list_templates", {"default", "code", "langgraph-agent", "cap1"} <= names, names)
    t = await call(client.get_template("langgraph-agent"))
    check(p + "get_template langgraph-agent", t.name == "langgraph-agent", t)
    await expect_error(p + "get_template unknown -> NotFoundError", NotFoundError,
                       lambda: client.get_template("no-such-template"))

    # The seed's quickstart template name.
    sb = await call(client.create_sandbox(template="langgraph-agent", name=f"qs-{tag}"))
    summary = await call(sb.wait_until_running(timeout=60, poll_interval=0.1))
    check(p + "create_sandbox langgraph-agent + wait_until_running",
          summary.phase is SandboxPhase.RUNNING, summary)
    check(p + "status", (await call(sb.status())).phase is SandboxPhase.RUNNING)
    listed = await call(client.list_sandboxes(namespace="default", status="Running"))
    check(p + "list_sandboxes", f"qs-{tag}" in {s.name for s in listed}, listed)
    again = await call(client.get_sandbox(f"qs-{tag}"))
    check(p + "get_sandbox", again.id == sb.id and again.name == f"qs-{tag}", again)
    await expect_error(p + "create_sandbox twice -> ConflictError", ConflictError,
                       lambda: client.create_sandbox(template="default", name=f"qs-{tag}"))

    # 424 before configure.
    await expect_error(p + "invoke before configure -> 424", APIError,
                       lambda: sb.agent.invoke(prompt="x"), status=424)

    # Configure with install output.
    logs = []

    def on_log(stream, line):
        logs.append((stream, line))

    result = await call(sb.agent.configure(
        files=[("/workspace/agent.py", AGENT)],
        install_command=["sh", "-c", "printf 'installing'; sleep 0.2; echo ' deps'; echo warn >&2"],
        entrypoint=["python3", "/workspace/agent.py"],
        on_log=on_log,
    ))
    check(p + "configure result", result.install_exit_code == 0 and not result.skipped
          and result.entrypoint == ["python3", "/workspace/agent.py"], result)
    check(p + "configure on_log: whole lines, streams apart",
          logs == [("stdout", "installing deps"), ("stderr", "warn")], logs)
    result = await call(sb.agent.configure(
        files=[("/workspace/agent.py", AGENT)],
        install_command=["sh", "-c", "printf 'installing'; sleep 0.2; echo ' deps'; echo warn >&2"],
        entrypoint=["python3", "/workspace/agent.py"],
    ))
    check(p + "configure again is skipped", result.skipped, result)

    # invoke: the output as the seed's SDK joins it.
    r = await call(sb.agent.invoke(prompt="world"))
    check(p + "invoke", r.stdout == "hello world" and r.exit_code == 0
          and r.reason == "completed" and r.invoke_id.startswith("inv-"), r)
    r = await call(sb.agent.invoke({"a": 1}))
    check(p + "invoke with a JSON payload on stdin", r.stdout == 'hello {"a": 1}', r)
    r = await call(sb.agent.invoke(prompt="two-flushes"))
    check(p + "a line written in two flushes is one line", r.stdout == "Thinking... done", r)
    r = await call(sb.agent.invoke(prompt="invalid-utf8"))
    check(p + "a line of invalid UTF-8 arrives (lossy)", r.stdout == "bad \ufffd line", r)
    for code in (0, 3, 42):
        r = await call(sb.agent.invoke(prompt=f"exit {code}"))
        check(p + f"exit code {code}", r.exit_code == code and r.stdout == "exiting", r)
    r = await call(sb.agent.invoke(prompt="streams"))
    check(p + "stdout and stderr apart", r.stdout == "o1\no2" and r.stderr == "e1", r)
    started = time.monotonic()
    r = await call(sb.agent.invoke(prompt="sleep", invoke_timeout="1s"))
    check(p + "invoke_timeout", r.reason == "timeout" and time.monotonic() - started < 10, r)

    # invoke_stream, then invoke_cancel of a running and of a finished invoke.
    stream = sb.agent.invoke_stream(prompt="sleep")
    seen = await events_until(stream, lambda e: e.event == "log")
    check(p + "invoke_stream start then log",
          [e.event for e in seen] == ["start", "log"] and seen[1].data["data"] == "ready", seen)
    iid = seen[0].data["invokeId"]
    await call(sb.agent.invoke_cancel(iid))
    rest = await events_until(stream, lambda e: e.event == "exit")
    check(p + "invoke_cancel of a running invoke",
          rest and rest[-1].event == "exit" and rest[-1].data["reason"] == "canceled", rest)
    await close(stream)
    await expect_error(p + "invoke_cancel of a finished invoke -> NotFoundError", NotFoundError,
                       lambda: sb.agent.invoke_cancel(iid))

    # Closing invoke_stream cancels (the seed's Router does): on a cap-1 template the process
    # is gone within the grace period and the next invoke is accepted at once.
    cap = await call(client.create_sandbox(template="cap1", name=f"cap-{tag}"))
    await call(cap.wait_until_running(timeout=60, poll_interval=0.1))
    await call(cap.agent.configure(files=[("/workspace/agent.py", AGENT)],
                                   entrypoint=["python3", "/workspace/agent.py"]))
    stream = cap.agent.invoke_stream(prompt="sleep")
    await events_until(stream, lambda e: e.event == "log")
    pid = int((await call(cap.files.read("/workspace/sleeper.pid"))).decode())
    check(p + "the sleeper runs", alive(pid), pid)
    await expect_error(p + "a second invoke on a cap-1 template -> 429", APIError,
                       lambda: cap.agent.invoke(prompt="x"), status=429)
    closed = time.monotonic()
    await close(stream)
    while alive(pid) and time.monotonic() - closed < GRACE + 5:
        await asyncio.sleep(0.01)
    gone = time.monotonic() - closed
    check(p + f"closing invoke_stream ends the process within the grace ({gone:.2f}s)",
          not alive(pid) and gone < GRACE, gone)
    # The runner releases the slot a few milliseconds after the process is gone (it reaps the
    # whole tree first), so a 429 may come in that window: retried every 20 ms. "At once" is
    # well under 2 s (with the old default, `linger`, it took the runner's --linger: 30 s).
    attempts = 0
    while True:
        attempts += 1
        tried = time.monotonic() - closed
        try:
            r = await call(cap.agent.invoke(prompt="after"))
            break
        except APIError as e:
            if e.status_code != 429 or tried > GRACE:
                raise
            await asyncio.sleep(0.02)
    check(p + f"the next invoke is accepted at once ({tried:.3f}s after the close, "
          f"attempt {attempts})", r.stdout == "hello after" and tried < 2.0, (r, tried))

    # Files.
    await call(sb.files.write("/workspace/notes.txt", "line 1\nline 2\n"))
    check(p + "files.write + read",
          await call(sb.files.read("/workspace/notes.txt")) == b"line 1\nline 2\n")
    await call(sb.files.write("/workspace/bin.dat", bytes(range(256))))
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "up.bin")
        with open(src, "wb") as f:
            f.write(b"\x00\xff" * 1000)
        n = await call(sb.files.upload("/workspace/sub/up.bin", src))
        check(p + "files.upload", n == 2000, n)
        dst = os.path.join(d, "down.bin")
        n = await call(sb.files.download("/workspace/bin.dat", dst))
        with open(dst, "rb") as f:
            check(p + "files.download", n == 256 and f.read() == bytes(range(256)), n)
        entries = await call(sb.files.list("/workspace"))
        by_name = {e.name: e for e in entries}
        check(p + "files.list",
              by_name["notes.txt"].size == 14 and by_name["sub"].is_dir
              and not by_name["notes.txt"].is_dir, entries)
        z = os.path.join(d, "ws.zip")
        n = await call(sb.files.archive(z, path="/workspace"))
        with zipfile.ZipFile(z) as zf:
            names = set(zf.namelist())
            check(p + "files.archive",
                  n > 0 and any(x.endswith("notes.txt") for x in names)
                  and any(x.endswith("up.bin") for x in names), names)
    await expect_error(p + "files.read of a missing file -> NotFoundError", NotFoundError,
                       lambda: sb.files.read("/workspace/nope.txt"))

    # exec works in both modes; configure does not in code mode (400).
    res = await call(sb.exec("echo hi; echo err >&2; exit 3"))
    check(p + "exec", res.stdout == "hi\n" and res.stderr == "err\n" and res.exit_code == 3, res)
    code = await call(client.create_sandbox(template="code", name=f"code-{tag}"))
    await call(code.wait_until_running(timeout=60, poll_interval=0.1))
    res = await call(code.exec("printf ok"))
    check(p + "exec in code mode", res.stdout == "ok" and res.exit_code == 0, res)
    await expect_error(p + "configure in code mode -> 400", APIError,
                       lambda: code.agent.configure(entrypoint=["true"]), status=400)

    # clone: a copy of the sandbox under the name given.
    cl = await call(sb.clone(name=f"cl-{tag}"))
    check(p + "clone", cl.name == f"cl-{tag}", cl.name)
    await call(cl.terminate())

    # Ports: forward (nothing needs to listen yet), list, remove; the preview URL names the
    # control plane's preview proxy.
    fp = await call(sb.forward_port(8080))
    check(p + "forward_port", fp.port == 8080 and fp.protocol == "http"
          and fp.preview_url == f"{URL}/api/v1/sandboxes/{sb.id}/preview/8080/"
          and fp.internal_url == "http://127.0.0.1:8080", fp)
    again = await call(sb.forward_port(8080))
    check(p + "forward_port again is the same port", again == fp, again)
    ports = await call(sb.list_ports())
    check(p + "list_ports", ports == [fp], ports)
    await call(sb.remove_port(8080))
    check(p + "remove_port", await call(sb.list_ports()) == [])
    await expect_error(p + "remove_port of a port not forwarded -> NotFoundError", NotFoundError,
                       lambda: sb.remove_port(8080))
    tcp = await call(sb.forward_port(9000, protocol="tcp"))
    check(p + "a tcp port has no preview URL", tcp.preview_url is None
          and tcp.internal_url == "tcp://127.0.0.1:9000", tcp)
    await call(sb.remove_port(9000))

    # Lifecycle: stop (409 on invoke), resume, terminate.
    await call(sb.stop())
    deadline = time.monotonic() + 30
    while (await call(sb.status())).phase is not SandboxPhase.STOPPED:
        assert time.monotonic() < deadline, "never Stopped"
        await asyncio.sleep(0.1)
    check(p + "stop", True)
    await expect_error(p + "invoke on a stopped sandbox -> ConflictError", ConflictError,
                       lambda: sb.agent.invoke(prompt="x"))
    await call(sb.resume())
    await call(sb.wait_until_running(timeout=60, poll_interval=0.1))
    r = await call(sb.agent.invoke(prompt="back"))
    check(p + "resume keeps the configuration", r.stdout == "hello back", r)
    for s in (sb, cap, code):
        await call(s.terminate())
    await expect_error(p + "terminate, then get_sandbox -> NotFoundError", NotFoundError,
                       lambda: client.get_sandbox(f"qs-{tag}"))


async def main():
    assert agenttier.__version__ == "0.8.1", agenttier.__version__
    with AgentTierClient(api_url=URL, auth=APIKeyAuth(KEY)) as client:
        await run(client, "sync")
    async with AsyncAgentTierClient(api_url=URL, auth=APIKeyAuth(KEY)) as client:
        await run(client, "async")
    print(f"ok: {checks} checks", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
