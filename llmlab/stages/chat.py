"""`llmlab chat`: talk to an assistant checkpoint in the terminal, streaming, with its tools.

Multi-turn; tool calls and their outputs are shown as they happen. Commands: /clear (forget the
conversation), /system TEXT (set the system prompt and start over), /temperature X, /think N [show],
/memory, /remember TEXT, /edit N TEXT, /forget N, /help, /quit. `--prompt "..."` answers one message and exits (for scripts).

Memory (llmlab.assistants.memory): everything the user says is kept as an entry, also after the oldest turns
have left the context; before each reply the entries that best match the message are read one at a time, and
if one holds the answer the reply is that, cited `[memory#N]`. /memory lists the entries, /edit N TEXT
rewrites one, /forget N drops one, /remember TEXT adds one; `--memory_file` keeps them across sessions; `--memory false` turns it off.

`/think N` (or `--think N`) answers with more compute (llmlab.think): a question that names a person is
answered only after N probes of the model's recall of that person (at most 12; verify-then-answer: "I don't
know who that is." for a name whose facts it cannot recall with confidence); any other message gets N sampled
replies, tools run in each, and the most common answer (self-consistency). A line before the answer says what
was weighed; `/think N show` lists the candidates too. `/think 0` goes back to one greedy pass.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from llmlab import checkpoint
from llmlab.assistants.memory import Memory, recall
from llmlab.chat import final_answer, fit_context, render_prompt, reply_stop_ids
from llmlab.engine import SEED_LIMIT, Engine, SamplingParams, ToolCalls
from llmlab.errors import LLMLabError
from llmlab.think.recall import name_in
from llmlab.think.strategies import MAX_BUDGET, Thinker
from llmlab.tokenizer import SPECIAL_TOKENS
from llmlab.tools import run_tool


def check_think(budget: int) -> None:
    if not 0 <= budget <= MAX_BUDGET:
        raise LLMLabError(f"/think takes a budget from 0 (off) to {MAX_BUDGET} (got {budget})")

TOOL_MARKS = {"<|tool_start|>": "\n[tool: ", "<|tool_end|>": "", "<|output_start|>": " -> ", "<|output_end|>": "]\n"}
HELP = ("/clear  forget the conversation   /system TEXT  set the system prompt   /temperature X   "
        "/think N [show]  answer with N samples or recall probes (0: off)   /memory  what it remembers   "
        "/remember TEXT   /edit N TEXT   /forget N   /help   /quit")


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
    sampling: SamplingParams = SamplingParams(max_new_tokens=200, temperature=0.0, top_k=50)
    """how replies are sampled (default: greedy; top_k 50 once /temperature is raised; replies of at most 200
    tokens; reply n is seeded with seed + n)"""
    tools: bool = True
    """run the assistant's tool calls (calculator, python, search)"""
    think: int = 0
    """System 2 budget of every reply (`/think N`): N samples voted, or N recall probes before answering about a
    person; 0 = one greedy pass"""
    recall: str = "runs/cpu/base"
    """the model whose recall /think probes about people (the assistant's pretrained base; "" = the assistant)"""
    memory: bool = True
    """keep what the user says as memory entries, read back when a message asks for one (see above)"""
    memory_file: str = ""
    """a JSON file the memory is loaded from and saved to after every change (empty: this session only)"""

    def __post_init__(self) -> None:
        check_think(self.think)


class Session:
    """A conversation with the model: `reply(text, out)` streams the answer to `out` and remembers it."""

    def __init__(self, cfg: Config):
        ckpt = checkpoint.load(cfg.checkpoint)
        if ckpt.tokenizer is None:
            raise LLMLabError(f"{ckpt.path} has no tokenizer.json: chat with a checkpoint saved with its tokenizer")
        self.cfg, self.tok, self.path = cfg, ckpt.tokenizer, ckpt.path
        self.engine = Engine(ckpt.model)
        self.sampling = cfg.sampling
        self.system = cfg.system
        self.messages: list[dict] = []
        self.turns = 0
        self.stops = reply_stop_ids(self.tok)
        self.think, self.show_search = cfg.think, False
        self._thinker: Thinker | None = None
        self.memory = Memory.load(cfg.memory_file) if cfg.memory and cfg.memory_file else Memory()

    def clear(self) -> None:
        self.messages = []

    def remember(self, text: str) -> int:
        i = self.memory.add(text)
        self.save_memory()
        return i

    def edit(self, text: str) -> None:
        """/edit N TEXT: a ValueError or LLMLabError (one line) for a number that is no entry, or no text."""
        number, _, new = text.strip().partition(" ")
        if not new.strip():
            raise ValueError("no text")
        self.memory.edit(int(number), new)
        self.save_memory()

    def forget(self, text: str) -> None:
        """/forget N: a ValueError or LLMLabError (one line) for a number that is no entry."""
        self.memory.forget(int(text))
        self.save_memory()

    def save_memory(self) -> None:
        if self.cfg.memory and self.cfg.memory_file:
            self.memory.save(self.cfg.memory_file)

    def from_memory(self, text: str, out) -> str | None:
        """The reply read from memory (see the module docstring), or None."""
        if not self.cfg.memory:
            return None
        reading = recall(self.engine, self.tok, self.memory, text)
        self.remember(text)
        if reading is None:
            return None
        out.write(reading.answer + "\n")
        return reading.answer

    def set_temperature(self, text: str) -> None:
        """/temperature X: a ValueError or LLMLabError (one line) for a value that is no valid temperature."""
        self.sampling = dataclasses.replace(self.sampling, temperature=float(text))

    def run_tool(self, call: str) -> str:
        return run_tool(call, world_dir=self.cfg.world).text

    def set_think(self, text: str) -> None:
        """/think N [show]: a ValueError or LLMLabError (one line) for a budget that is not one."""
        budget, _, show = text.partition(" ")
        check_think(int(budget))
        self.think, self.show_search = int(budget), show.strip() == "show"

    def thinker(self) -> Thinker:
        if self._thinker is None:
            self._thinker = Thinker(self.engine, self.tok, temperature=max(self.sampling.temperature, 1.0),
                                    max_new_tokens=self.sampling.max_new_tokens, seed=self.sampling.seed,
                                    run_tool=self.run_tool if self.cfg.tools else None, world=self.cfg.world,
                                    recall=self.cfg.recall)
        self._thinker.temperature = max(self.sampling.temperature, 1.0)  # (/temperature may have changed since)
        return self._thinker

    def thought(self, messages: list[dict], text: str, out) -> str:
        """The answer of /think (Thinker.respond): verify for a question naming a person, else a vote."""
        thinker = self.thinker()
        a, strategy, budget = thinker.respond(messages, self.think, seed=(self.sampling.seed + self.turns) % SEED_LIMIT)
        if strategy == "verify":
            out.write(f"(recalled {name_in(text)} with {budget} probes: confidence {a.candidates[0][1]:.2f}, "
                      f"threshold {thinker.thresholds[budget]:.2f})\n")
        else:
            top = a.candidates[0][1] if a.candidates else 0
            out.write(f"({budget} replies, {top:.0f} agree on this answer)\n")
        if self.show_search:
            for candidate, score in a.candidates:
                out.write(f"  [{score:.2f}] {candidate}\n")
        out.write(a.text + "\n")
        return a.text

    def reply(self, text: str, out=None) -> str:
        out = out or sys.stdout  # looked up at call time (it may have been replaced since import)
        _check_utf8("the message", text)
        _check_utf8("the system prompt", self.system)
        system = [{"role": "system", "content": self.system}] if self.system else []
        # The oldest exchanges make way when the reply would have less than half the context (or max_new_tokens)
        context = self.engine.model.config.context_len
        longest = self.sampling.max_new_tokens
        messages, dropped = fit_context(self.tok, self.messages + [{"role": "user", "content": text}], context,
                                        min(longest, context // 2), system)
        prompt = render_prompt(self.tok, system + messages)
        if dropped:
            what = "the oldest exchange" if dropped == 1 else f"the {dropped} oldest exchanges"
            out.write(f"({what} left out to fit the model's {context}-token context)\n")
        budget = context - len(prompt)
        if budget < 8:
            raise LLMLabError(f"the message leaves no room for a reply in the model's {context}-token context "
                              f"({len(prompt)} tokens): shorten it" + (" or the system prompt" if system else ""))
        if (answer := self.from_memory(text, out)) is not None:
            self.turns += 1
            self.messages = messages + [{"role": "assistant", "content": answer}]
            return answer
        if self.think:
            answer = self.thought(system + messages, text, out)
            self.turns += 1
            self.messages = messages + [{"role": "assistant", "content": answer}]
            return answer
        params = dataclasses.replace(self.sampling, max_new_tokens=min(longest, budget),
                                     seed=(self.sampling.seed + self.turns) % SEED_LIMIT)
        tools = ToolCalls(self.tok, 1, self.run_tool) if self.cfg.tools else None
        ids: list[int] = []
        text_out = self.tok.stream_decoder()
        for tokens, _ in self.engine.steps([prompt], params, choose=tools):
            t = int(tokens[0])
            if t in self.stops:
                break
            ids.append(t)
            if t < len(SPECIAL_TOKENS):  # tool calls and outputs, shown as [tool: call -> result]
                out.write(text_out.flush() + TOOL_MARKS.get(SPECIAL_TOKENS[t], ""))
            else:
                out.write(text_out.push(t))
            out.flush()
        out.write(text_out.flush() + "\n")
        self.turns += 1
        answer = final_answer(self.tok, ids).strip()  # remembered: its words, not the tools' outputs
        self.messages = messages + [{"role": "assistant", "content": answer}]
        return answer


def _check_utf8(what: str, text: str) -> None:
    """A one-line LLMLabError for text that is not valid UTF-8: bytes a shell passed in (`--prompt $'\\xff'`), which
    Python keeps as lone surrogates (surrogateescape) that no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        shown = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        raise LLMLabError(f"{what} is not valid UTF-8 ({shown} at character {e.start}): send UTF-8 text (check the "
                          f"terminal's encoding, e.g. LANG=C.UTF-8)") from None


def _setting(change, done, usage: str) -> None:
    """Run a command's change and print what it did (`done()`); its usage for an argument that is no number,
    the error for a value out of range."""
    try:
        change()
        print(done())
    except ValueError:
        print(usage)
    except LLMLabError as e:
        print(f"error: {e}")


def main(cfg: Config) -> dict:
    session = Session(cfg)
    if cfg.prompt:
        return {"reply": session.reply(cfg.prompt)}
    print(f"llmlab chat: {session.path}  ({HELP})")
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
            elif command == "/think":
                _setting(lambda: session.set_think(arg), lambda: f"(thinking with a budget of {session.think})"
                         if session.think else "(one greedy pass)", "usage: /think 16   (0: off; add `show` to list "
                         "the candidates)")
            elif command == "/memory":
                entries = [(i, e) for i, e in enumerate(session.memory.entries) if e is not None]
                for i, entry in entries:
                    print(f"  [{i}] {entry}")
                print(f"({len(entries)} entries)" if session.cfg.memory else "(memory is off: --memory true)")
            elif command == "/remember" and arg:
                print(f"(remembered as entry {session.remember(arg)})")
            elif command == "/edit":
                _setting(lambda: session.edit(arg), lambda: f"(entry {arg.split()[0]} rewritten)",
                         "usage: /edit 3 My locker number is 12.   (see /memory for the numbers)")
            elif command == "/forget":
                _setting(lambda: session.forget(arg), lambda: f"(entry {arg} forgotten)",
                         "usage: /forget 3   (see /memory for the numbers)")
            elif command == "/temperature":
                _setting(lambda: session.set_temperature(arg), lambda: f"(temperature {session.sampling.temperature})",
                         "usage: /temperature 0.7")
            else:
                print(HELP)
            continue
        print("assistant> ", end="", flush=True)
        try:
            session.reply(line)
        except LLMLabError as e:
            print(f"error: {e}")
    return {"turns": session.turns}
