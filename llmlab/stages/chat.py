"""`llmlab chat`: talk to an assistant checkpoint in the terminal, streaming, with its tools.

Multi-turn; tool calls and their outputs are shown as they happen. Commands: /clear (forget the
conversation), /system TEXT (set the system prompt and start over), /temperature X, /help, /quit.
`--prompt "..."` answers one message and exits (for scripts).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from llmlab import checkpoint
from llmlab.engine import Engine, SamplingParams, ToolCalls
from llmlab.errors import LLMLabError
from llmlab.tokenizer import SPECIAL_TOKENS, Tokenizer

TOOL_MARKS = {"<|tool_start|>": "\n[tool: ", "<|tool_end|>": "", "<|output_start|>": " -> ", "<|output_end|>": "]\n"}
HELP = "/clear  forget the conversation   /system TEXT  set the system prompt   /temperature X   /help   /quit"


@dataclass
class Config:
    checkpoint: str = "runs/cpu/sft"
    """assistant checkpoint (a directory with `latest`, or a step directory)"""
    world: str = "runs/cpu/world"
    """world directory for the search tool"""
    prompt: str = ""
    """answer this one message and exit (empty: interactive)"""
    system: str = ""
    """system prompt"""
    temperature: float = 0.0
    """sampling temperature (0 = greedy)"""
    top_k: int = 50
    """sample among the k most likely tokens (0 = all)"""
    max_new_tokens: int = 200
    """longest reply, in tokens"""
    tools: bool = True
    """run the assistant's tool calls (calculator, python, search)"""
    seed: int = 0
    """sampling seed"""


class Session:
    """A conversation with the model: `reply(text, out)` streams the answer to `out` and remembers it."""

    def __init__(self, cfg: Config):
        ckpt = checkpoint.resolve(cfg.checkpoint)
        self.cfg, self.tok = cfg, Tokenizer.load(ckpt)
        self.engine = Engine(checkpoint.load_model(ckpt))
        self.temperature = cfg.temperature
        self.system = cfg.system
        self.messages: list[dict] = []
        self.turns = 0
        self.end = self.tok.special_id("<|assistant_end|>")

    def clear(self) -> None:
        self.messages = []

    def run_tool(self, call: str) -> str:
        from llmlab.tools import run_tool

        return run_tool(call, world_dir=self.cfg.world).text

    def reply(self, text: str, out=None) -> str:
        from llmlab.chat import render_prompt

        out = out or sys.stdout  # looked up at call time (it may have been replaced since import)
        system = [{"role": "system", "content": self.system}] if self.system else []
        messages = self.messages + [{"role": "user", "content": text}]
        prompt = render_prompt(self.tok, system + messages)
        # The oldest exchanges make way when the reply would have less than half the context (or max_new_tokens)
        context = self.engine.model.config.context_len
        room = min(self.cfg.max_new_tokens, context // 2)
        dropped = 0
        while context - len(prompt) < room and len(messages) > 1:
            first_reply = next(i for i, m in enumerate(messages) if i > 0 and m["role"] == "user")
            messages, dropped = messages[first_reply:], dropped + 1
            prompt = render_prompt(self.tok, system + messages)
        if dropped:
            what = "the oldest exchange" if dropped == 1 else f"the {dropped} oldest exchanges"
            out.write(f"({what} left out to fit the model's {context}-token context)\n")
        budget = context - len(prompt)
        if budget < 8:
            raise LLMLabError(f"the message leaves no room for a reply in the model's {context}-token context "
                              f"({len(prompt)} tokens): shorten it" + (" or the system prompt" if system else ""))
        params = SamplingParams(max_new_tokens=min(self.cfg.max_new_tokens, budget), temperature=self.temperature,
                                top_k=self.cfg.top_k, seed=self.cfg.seed + self.turns)
        tools = ToolCalls(self.tok, 1, self.run_tool) if self.cfg.tools else None
        ids: list[int] = []
        text_out = self.tok.stream_decoder()
        for tokens, _ in self.engine.steps([prompt], params, choose=tools):
            t = int(tokens[0])
            if t == self.end or t == self.tok.bos_id:
                break
            ids.append(t)
            if t < len(SPECIAL_TOKENS):  # tool calls and outputs, shown as [tool: call -> result]
                out.write(text_out.flush() + TOOL_MARKS.get(SPECIAL_TOKENS[t], ""))
            else:
                out.write(text_out.push(t))
            out.flush()
        out.write(text_out.flush() + "\n")
        self.turns += 1
        # remembered: the assistant's words after its last tool output
        out_end = self.tok.special_id("<|output_end|>")
        last = max((i for i, t in enumerate(ids) if t == out_end), default=-1)
        answer = self.tok.decode([t for t in ids[last + 1:] if t >= len(SPECIAL_TOKENS)]).strip()
        self.messages = messages + [{"role": "assistant", "content": answer}]
        return answer


def main(cfg: Config) -> dict:
    session = Session(cfg)
    if cfg.prompt:
        return {"reply": session.reply(cfg.prompt)}
    print(f"llmlab chat: {checkpoint.resolve(cfg.checkpoint)}  ({HELP})")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            break
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command == "/quit":
                break
            elif command == "/clear":
                session.clear()
                print("(conversation cleared)")
            elif command == "/system":
                session.system = arg
                session.clear()
                print("(system prompt set; conversation cleared)")
            elif command == "/temperature":
                try:
                    session.temperature = max(0.0, float(arg))
                    print(f"(temperature {session.temperature})")
                except ValueError:
                    print("usage: /temperature 0.7")
            else:
                print(HELP)
            continue
        print("assistant> ", end="", flush=True)
        try:
            session.reply(line)
        except LLMLabError as e:
            print(f"error: {e}")
    return {"turns": session.turns}
