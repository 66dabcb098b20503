#!/usr/bin/env python3
"""A small ACP agent built on the official Python SDK (`pip install agent-client-protocol`), for
the runner's ACP tests. The SDK does the protocol side: framing, initialize, sessions.

Prompts: `write TEXT` asks permission (kind `edit`) and appends TEXT to acp.txt in the session's
cwd when allowed (`write! TEXT` the same, offering no `allow_once`); `garbage` writes a line
that is not UTF-8 to stdout and one to stderr before it answers; `wait` runs until canceled; `stuck` ignores cancel; anything else is echoed. Every answer names the
turn number and the process id, so the tests can tell one process per session from many.
`crash` exits with code 7 mid-turn; `recall` says every earlier prompt of the ACP session (its
memory, kept in a file in the cwd so that `session/load` in a new process restores it); `mcp`
says the MCP servers the session was given; `state` says the config options' values. A prompt
with blocks other than text is described block by block. With `AGENT_NAME` set, every answer
starts with `[NAME] `; with `ACP_TEST_PLAIN=1` the agent advertises no capabilities (no
`loadSession`, no images, no embedded resources).
"""
import asyncio
import json
import os
import uuid

from acp import (
    PROTOCOL_VERSION,
    RequestError,
    Agent,
    InitializeResponse,
    LoadSessionResponse,
    NewSessionResponse,
    PromptResponse,
    SetSessionModeResponse,
    run_agent,
    text_block,
    update_agent_message,
)
from acp.helpers import update_current_mode

PLAIN = os.environ.get("ACP_TEST_PLAIN") == "1"
NAME = os.environ.get("AGENT_NAME")
from acp.schema import (
    AgentCapabilities,
    PermissionOption,
    PromptCapabilities,
    SessionConfigOptionSelect,
    SessionConfigSelectOption,
    SetSessionConfigOptionResponse,
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
        self.mcp = {}
        self.values = {"model": "small", "thought": "low"}

    def on_connect(self, conn):
        self.conn = conn

    async def initialize(self, protocol_version, client_capabilities=None, client_info=None, **kwargs):
        if PLAIN:
            return InitializeResponse(protocol_version=PROTOCOL_VERSION)
        caps = AgentCapabilities(
            load_session=True,
            prompt_capabilities=PromptCapabilities(image=True, embedded_context=True),
        )
        return InitializeResponse(protocol_version=PROTOCOL_VERSION, agent_capabilities=caps)

    def options(self):
        def select(id, category, values):
            return SessionConfigOptionSelect(
                id=id, name=id.title(), category=category, type="select",
                current_value=self.values[id],
                options=[SessionConfigSelectOption(value=v, name=v.title()) for v in values],
            )
        return [select("model", "model", ["small", "large"]), select("thought", "thought_level", ["low", "high"])]

    def modes(self):
        return SessionModeState(
            current_mode_id=self.mode,
            available_modes=[SessionMode(id="ask", name="Ask"), SessionMode(id="yolo", name="Yolo")],
        )

    def memory_file(self, session_id):
        return os.path.join(self.cwd[session_id], f".acp-memory-{session_id}.json")

    def memory(self, session_id):
        try:
            with open(self.memory_file(session_id)) as f:
                return json.load(f)
        except FileNotFoundError:
            return []

    def remember_mcp(self, session_id, mcp_servers):
        self.mcp[session_id] = [
            f"{s.name}:{getattr(s, 'command', None) or getattr(s, 'url', None)}" for s in mcp_servers or []
        ]

    async def new_session(self, cwd, mcp_servers=None, **kwargs):
        session_id = uuid.uuid4().hex
        self.cwd[session_id] = cwd
        self.remember_mcp(session_id, mcp_servers)
        return NewSessionResponse(session_id=session_id, modes=self.modes(), config_options=self.options())

    async def load_session(self, cwd, session_id, mcp_servers=None, **kwargs):
        if PLAIN:
            raise RequestError.method_not_found("session/load")
        self.cwd[session_id] = cwd
        if not os.path.exists(self.memory_file(session_id)):
            raise RequestError.invalid_params({"sessionId": "unknown session"})
        self.remember_mcp(session_id, mcp_servers)
        # ACP: the agent replays the conversation as updates before it answers.
        for text in self.memory(session_id):
            await self.say(session_id, f"replayed {text}")
        return LoadSessionResponse(modes=self.modes(), config_options=self.options())

    async def set_session_mode(self, mode_id, session_id, **kwargs):
        self.mode = mode_id
        # Also announced as an update, between turns.
        await self.conn.session_update(session_id=session_id, update=update_current_mode(mode_id))
        return SetSessionModeResponse()

    async def set_config_option(self, config_id, session_id, value, **kwargs):
        if config_id not in self.values:
            raise RequestError.invalid_params({"configId": config_id})
        self.values[config_id] = value
        return SetSessionConfigOptionResponse(config_options=self.options())

    async def say(self, session_id, text):
        if NAME:
            text = f"[{NAME}] {text}"
        await self.conn.session_update(session_id=session_id, update=update_agent_message(text_block(text)))

    async def prompt(self, prompt, session_id, **kwargs):
        self.turns += 1
        text = " ".join(getattr(block, "text", "") for block in prompt)
        tag = f"turn {self.turns} pid {os.getpid()} mode {self.mode}"
        memory = self.memory(session_id)
        with open(self.memory_file(session_id), "w") as f:
            json.dump(memory + [text], f)
        if any(block.type != "text" for block in prompt):
            parts = []
            for block in prompt:
                if block.type == "text":
                    parts.append(f"text:{block.text}")
                elif block.type == "image":
                    parts.append(f"image:{block.mime_type}:{block.data}")
                elif block.type == "resource":
                    parts.append(f"resource:{block.resource.uri}:{block.resource.text}")
                elif block.type == "resource_link":
                    parts.append(f"resource_link:{block.uri}")
                else:
                    parts.append(block.type)
            await self.say(session_id, f"got {'; '.join(parts)} {tag}")
            return PromptResponse(stop_reason="end_turn")
        if text == "crash":
            await self.say(session_id, f"crashing {tag}")
            await asyncio.sleep(0.2)
            os._exit(7)
        if text == "recall":
            await self.say(session_id, f"recall {'|'.join(memory)} {tag}")
            return PromptResponse(stop_reason="end_turn")
        if text == "mcp":
            await self.say(session_id, f"mcp {','.join(self.mcp.get(session_id, []))} {tag}")
            return PromptResponse(stop_reason="end_turn")
        if text == "state":
            await self.say(session_id, f"state model {self.values['model']} thought {self.values['thought']} {tag}")
            return PromptResponse(stop_reason="end_turn")
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
