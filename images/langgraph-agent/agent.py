"""An example LangGraph agent that runs offline: a deterministic graph, no model provider.

The prompt is stdin; every step's update is printed (and so streamed by agentbox-runner) as it
happens. Configure it with the entrypoint ["python3", "/opt/agent/agent.py"].
"""

import sys
from typing import TypedDict

from langgraph.graph import END, START, StateGraph


class State(TypedDict):
    prompt: str
    words: list[str]
    answer: str


def plan(state: State) -> dict:
    # A stand-in for a chat model: split the prompt into the words to answer.
    return {"words": state["prompt"].split()}


def answer(state: State) -> dict:
    words = state["words"]
    text = f"{len(words)} word(s): " + " ".join(reversed(words)) if words else "empty prompt"
    return {"answer": text}


def build():
    graph = StateGraph(State)
    graph.add_node("plan", plan)
    graph.add_node("answer", answer)
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "answer")
    graph.add_edge("answer", END)
    return graph.compile()


def main() -> int:
    prompt = sys.stdin.read().strip()
    final = None
    for update in build().stream({"prompt": prompt, "words": [], "answer": ""}, stream_mode="updates"):
        for node, change in update.items():
            print(f"[{node}] {change}", flush=True)
            if "answer" in change:
                final = change["answer"]
    print(final, flush=True)
    return 0 if final else 1


if __name__ == "__main__":
    sys.exit(main())
