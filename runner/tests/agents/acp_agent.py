#!/usr/bin/env python3
"""A small ACP agent built on the official Python SDK (`pip install agent-client-protocol`), for
the runner's ACP tests. The SDK does the protocol side: framing, initialize, sessions.

Prompts: `write TEXT` asks permission (kind `edit`) and appends TEXT to acp.txt in the session's
cwd when allowed (`write! TEXT` the same, offering no `allow_once`); `garbage` writes a line
that is not UTF-8 to stdout and one to stderr before it answers; `wait` runs until canceled; `stuck` ignores cancel; anything else is echoed. Every answer names the
turn number and the process id, so the tests can tell one process per session from many.
"""
import asyncio
import os
import uuid

from acp import (
    PROTOCOL_VERSION,
    Agent,
    InitializeResponse,
    NewSessionResponse,
    PromptResponse,
    SetSessionModeResponse,
    run_agent,
    text_block,
    update_agent_message,
)
from acp.schema import (
    PermissionOption,
    SessionMode,
    SessionModeState,
    ToolCallUpdate,
)


class TestAgent(Agent):
    def __init__(self):
        self.conn = None
        self.turns = 0
        self.cwd = {}
        self.mode = "ask"
        self.cancelled = {}

    def on_connect(self, conn):
        self.conn = conn

    async def initialize(self, protocol_version, client_capabilities=None, client_info=None, **kwargs):
        return InitializeResponse(protocol_version=PROTOCOL_VERSION)

    async def new_session(self, cwd, mcp_servers=None, **kwargs):
        session_id = uuid.uuid4().hex
        self.cwd[session_id] = cwd
        modes = SessionModeState(
            current_mode_id=self.mode,
            available_modes=[SessionMode(id="ask", name="Ask"), SessionMode(id="yolo", name="Yolo")],
        )
        return NewSessionResponse(session_id=session_id, modes=modes)

    async def set_session_mode(self, mode_id, session_id, **kwargs):
        self.mode = mode_id
        return SetSessionModeResponse()

    async def say(self, session_id, text):
        await self.conn.session_update(session_id=session_id, update=update_agent_message(text_block(text)))

    async def prompt(self, prompt, session_id, **kwargs):
        self.turns += 1
        text = " ".join(getattr(block, "text", "") for block in prompt)
        tag = f"turn {self.turns} pid {os.getpid()} mode {self.mode}"
        if text.startswith("write ") or text.startswith("write! "):
            options = [
                PermissionOption(option_id="allow-once", name="Allow", kind="allow_once"),
                PermissionOption(option_id="allow-always", name="Always allow", kind="allow_always"),
                PermissionOption(option_id="reject", name="Reject", kind="reject_once"),
                PermissionOption(option_id="reject-always", name="Never", kind="reject_always"),
            ]
            if text.startswith("write! "):
                options = options[1:]
            tool_call = ToolCallUpdate(tool_call_id=f"call-{self.turns}", title="Write acp.txt", kind="edit")
            response = await self.conn.request_permission(session_id=session_id, tool_call=tool_call, options=options)
            outcome = response.outcome
            if outcome.outcome == "selected" and outcome.option_id.startswith("allow"):
                with open(os.path.join(self.cwd[session_id], "acp.txt"), "a") as f:
                    f.write(text.split(" ", 1)[1] + "\n")
                await self.say(session_id, f"wrote ({outcome.option_id}) {tag}")
            else:
                why = outcome.option_id if outcome.outcome == "selected" else outcome.outcome
                await self.say(session_id, f"refused ({why}) {tag}")
            return PromptResponse(stop_reason="end_turn")
        if text == "garbage":
            os.write(2, b"bad \xff stderr\n")
            # stderr and stdout are two pipes with no order between them: the runner's stderr
            # reader needs a moment before the turn's answer ends the turn, or the line lands
            # between turns (logged by the runner, not journaled).
            await asyncio.sleep(0.3)
            os.write(1, b"\xff\xfe not UTF-8\n")
            await self.say(session_id, f"after garbage {tag}")
            return PromptResponse(stop_reason="end_turn")
        if text == "stuck":
            # Ignores session/cancel: the runner must kill it after the grace period.
            await self.say(session_id, f"stuck {tag}")
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    continue
        if text == "wait":
            event = self.cancelled.setdefault(session_id, asyncio.Event())
            event.clear()
            await self.say(session_id, f"waiting {tag}")
            await event.wait()
            return PromptResponse(stop_reason="cancelled")
        await self.say(session_id, f"echo {text} {tag}")
        return PromptResponse(stop_reason="end_turn")

    async def cancel(self, session_id, **kwargs):
        self.cancelled.setdefault(session_id, asyncio.Event()).set()


if __name__ == "__main__":
    asyncio.run(run_agent(TestAgent()))
