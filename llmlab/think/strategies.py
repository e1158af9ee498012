"""Strategies that trade inference compute for accuracy, behind one interface: `Thinker.answer(messages,
strategy, budget)`. The budget N counts sampled replies (for beam search, next steps proposed per level).

    greedy      one reply at temperature 0, the budget ignored: System 1
    vote        N sampled replies; the most common conclusion wins, replies that conclude nothing do not vote
                (self-consistency, Wang et al. 2022)
    claim       vote among the replies that claim an answer, those that give up (the `give_up` answer: for
                puzzles "There is no solution.") voting only when no reply claims one: a puzzle's solution is a
                construction its own last step shows reaching the target, so one reply that claims it outweighs
                many that did not find one. The claim is read, not checked (a miscopied list of numbers left
                can claim falsely)
    sequential  claim, sampling ROUND replies at a time until one claims an answer or N are drawn: each
                problem gets the budget its difficulty needs, as its samples reveal it
    orm         N sampled replies; an outcome verifier picks the best (best-of-N, Cobbe et al. 2021)
    prm         N sampled replies; a process verifier scores every prefix of each, a reply ranks by its weakest
                step (Lightman et al. 2023)
    beam        step-level search: `width` partial replies are kept; each proposes N // width next lines; the
                process verifier scores every extended reply and the best `width` unfinished ones go on, until
                none is left or max_steps lines are written; the best finished reply wins (the breadth-first
                search of Tree of Thoughts, Yao et al. 2023, with a learned value)
    verify      for a question about a person: N probes of the model's recall of that person's facts first
                (llmlab.think.recall); "I don't know who that is." when the recall is less sure than a threshold
                calibrated on known people, else greedy

Every answer reports its compute: tokens generated, tokens the generator processed (prompts once per distinct
prompt of a call, plus the generated ones) and tokens the verifier read; FLOPs are 2 x parameters per token of
each model. A search that finishes no reply answers `give_up` (for puzzles "There is no solution."), so every
strategy ends within its budget.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from llmlab import checkpoint
from llmlab import world as world_lib
from llmlab.alignment.rollouts import ModelReward
from llmlab.chat import final_answer, render_conversation, render_prompt, reply_stop_ids
from llmlab.engine import Engine, SamplingParams, generate_with_tools, newline_ids
from llmlab.errors import LLMLabError
from llmlab.model import GPT
from llmlab.tasks.puzzles import read_attempt, reply_conclusion
from llmlab.think.recall import DONT_KNOW, MAX_FLAGGED, PROBES, Recall, calibrate, calibration_names, name_in
from llmlab.tokenizer import Tokenizer
from llmlab.world.puzzles import NO_SOLUTION, as_calls, parse_question

STRATEGIES = ("greedy", "vote", "claim", "sequential", "orm", "prm", "beam", "verify")
SEARCHES = STRATEGIES[:7]
"""the strategies that sample and search (the puzzles' curves); verify checks a person's facts before answering"""
MAX_BUDGET = 4096
ROUND = 4
"""replies sequential samples at a time"""


@dataclass
class Compute:
    generated: int = 0
    """tokens sampled"""
    processed: int = 0
    """tokens the generator ran over: each distinct prompt of a call once, and every generated token"""
    scored: int = 0
    """tokens the verifier read"""

    def add(self, other: Compute) -> Compute:
        return Compute(self.generated + other.generated, self.processed + other.processed, self.scored + other.scored)

    def flops(self, generator_params: int, verifier_params: int) -> float:
        return 2.0 * generator_params * self.processed + 2.0 * verifier_params * self.scored


@dataclass
class Answer:
    text: str
    compute: Compute
    candidates: list[tuple[str, float]] = field(default_factory=list)
    """the replies weighed, each with its score (votes, or the verifier's), best first: the search to show"""


def check_budget(strategy: str, budget: int) -> None:
    if strategy not in STRATEGIES:
        raise LLMLabError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if not 1 <= budget <= MAX_BUDGET:
        raise LLMLabError(f"the budget must be from 1 to {MAX_BUDGET} samples (got {budget})")


class Thinker:
    """A generator (the assistant), optional verifiers (reward models of `llmlab rm`), and how to sample."""

    def __init__(self, engine: Engine, tok: Tokenizer, *, outcome: GPT | ModelReward | None = None,
                 process: GPT | ModelReward | None = None,
                 temperature: float = 1.0, max_new_tokens: int = 96, step_tokens: int = 32, max_steps: int = 6,
                 give_up: str = "", seed: int = 0, run_tool: Callable[[str], str] | None = None, world: str = "",
                 recall: str = ""):
        """`run_tool` runs the replies' tool calls. A reply is the text that is voted on, scored and shown: the
        words after the turn's last tool output, or, when the question is one of the world's puzzles, the whole
        turn with each calculator call a step (`read`, `as_reply`)."""
        if temperature <= 0:
            raise LLMLabError("the sampling temperature of a search must be above 0 (greedy is its own strategy)")
        self.engine, self.tok = engine, tok
        self.outcome, self.process = (m if m is None or isinstance(m, ModelReward) else ModelReward(m, tok)
                                      for m in (outcome, process))
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.step_tokens, self.max_steps = step_tokens, max_steps
        self.give_up, self.seed = give_up, seed
        self.reply_stops = reply_stop_ids(tok)
        self.line_stops = newline_ids(tok)
        self.run_tool = run_tool
        self.world, self.recall_path = world, recall
        self.recall: Recall | None = None
        self.thresholds: dict[int, float] = {}
        self.generator_params = engine.model.num_params()
        # (a verifier with a likelihood prior also runs its reference over what it reads)
        self.verifier_params = max((m.model.num_params() + (m.reference.num_params() if m.weight else 0)
                                    for m in (self.outcome, self.process) if m), default=0)

    # ---- replies: what is read of a generated turn, and the messages of a reply -------------------------------

    def read(self, messages: list[dict], ids: list[int]) -> str:
        """The reply a generated turn gives to `messages`: a puzzle's whole turn as its lines (from_calls), else
        the words after its last tool output."""
        if parse_question(messages[-1]["content"]) is not None:
            return read_attempt(self.tok, ids)
        return final_answer(self.tok, ids)

    @staticmethod
    def as_reply(messages: list[dict], text: str) -> list[dict]:
        """The assistant's messages of a reply to `messages` (a puzzle's lines as calculator calls, as_calls)."""
        if parse_question(messages[-1]["content"]) is not None:
            return as_calls(text)
        return [{"role": "assistant", "content": text}]

    @staticmethod
    def conclude(messages: list[dict], text: str) -> str | None:
        """What a reply concludes, for vote and claim (None: nothing): a puzzle's claim, else the reply."""
        return reply_conclusion(messages, text)

    def claims(self, messages: list[dict], texts: list[str]) -> list[bool]:
        """Whether each reply claims an answer: concludes something, and not what giving up concludes."""
        gave_up = self.conclude(messages, self.give_up or NO_SOLUTION)
        return [c not in (None, gave_up) for c in (self.conclude(messages, t) for t in texts)]

    # ---- the one interface ------------------------------------------------------------------------------------

    def answer(self, messages: list[dict], strategy: str, budget: int, seed: int | None = None) -> Answer:
        check_budget(strategy, budget)
        seed = self.seed if seed is None else seed
        if strategy == "greedy":
            texts, compute = self.sample(messages, 1, seed, temperature=0.0)
            return Answer(texts[0], compute, [(texts[0], 0.0)])
        if strategy == "beam":
            return self.beam(messages, budget, seed)
        if strategy == "verify":
            return self.verified(messages, budget)
        if strategy == "sequential":
            return self.sequential(messages, budget, seed)
        texts, compute = self.sample(messages, budget, seed)
        return self.pick(messages, texts, strategy, compute)

    def sequential(self, messages: list[dict], budget: int, seed: int) -> Answer:
        texts, compute = [], Compute()
        while len(texts) < budget and not any(self.claims(messages, texts)):
            more, spent = self.sample(messages, min(ROUND, budget - len(texts)), seed + len(texts))
            texts, compute = texts + more, compute.add(spent)
        return self.pick(messages, texts, "claim", compute)

    def pick(self, messages: list[dict], texts: list[str], strategy: str, compute: Compute | None = None,
             scored: tuple[list[float], list[int]] | None = None) -> Answer:
        """The answer of `vote`, `orm` or `prm` among replies already sampled; `compute` is what sampling them
        cost, the verifier's reading is added. `scored` (each reply's score and tokens read, from `score`) lets
        curves score one set of samples once and pick among any subset of them."""
        compute = compute or Compute()
        if strategy in ("vote", "claim"):
            conclusions = [self.conclude(messages, t) for t in texts]
            claimed = self.claims(messages, texts) if strategy == "claim" else []
            if any(claimed):  # (claim) those that give up vote only when no reply claims
                conclusions = [c if ok else None for c, ok in zip(conclusions, claimed)]
            votes = Counter(c for c in conclusions if c is not None)
            if not votes:
                return Answer(texts[0] if texts else self.give_up, compute)
            ranked = [(t, float(votes[c])) for t, c in zip(texts, conclusions) if c is not None]
            ranked.sort(key=lambda ts: -ts[1])  # stable: the first sample of the winning conclusion leads
            return Answer(ranked[0][0], compute, ranked)
        scores, read = scored if scored is not None else self.score(messages, texts, strategy)
        ranked = sorted(zip(texts, scores), key=lambda ts: -ts[1])
        return Answer(ranked[0][0], compute.add(Compute(scored=sum(read))), ranked)

    # ---- verify-then-answer ------------------------------------------------------------------------------

    def respond(self, messages: list[dict], budget: int, seed: int | None = None) -> tuple[Answer, str, int]:
        """System 2 for any conversation, as chat's /think and the API's reasoning_effort use it: (the answer, the
        strategy, its budget). A last message naming a person gets verify with min(budget, 12) probes, one of the
        world's puzzles claim over `budget` replies, any other a vote over `budget` replies."""
        if parse_question(messages[-1]["content"]) is not None:
            return self.answer(messages, "claim", budget, seed), "claim", budget
        if name_in(messages[-1]["content"]) is None:
            return self.answer(messages, "vote", budget, seed), "vote", budget
        probes = min(budget, len(PROBES))
        return self.answer(messages, "verify", probes), "verify", probes

    def verified(self, messages: list[dict], probes: int) -> Answer:
        """Greedy, unless the question names a person whose recall over `probes` probes is less sure than the
        calibrated threshold (calibrated here on first use, from `world`): then "I don't know who that is."
        (llmlab.think.recall)."""
        threshold = self.calibrated(probes)
        name = name_in(messages[-1]["content"])
        if name is None:  # (no person named: nothing to verify)
            texts, compute = self.sample(messages, 1, self.seed, temperature=0.0)
            return Answer(texts[0], compute, [(texts[0], 0.0)])
        confidence, read = self.recall.confidence(name, probes)
        if confidence < threshold:
            return Answer(DONT_KNOW, Compute(processed=read), [(DONT_KNOW, confidence)])
        texts, compute = self.sample(messages, 1, self.seed, temperature=0.0)
        return Answer(texts[0], compute.add(Compute(processed=read)), [(texts[0], confidence)])

    def recaller(self) -> Recall:
        """The recall verify probes, made on first use from `world` and the model at `recall` ("" = the
        generator's)."""
        if self.recall is None:
            if not self.world:
                raise LLMLabError("verify needs a threshold calibrated on the people of a world: give the Thinker "
                                  "world= (`llmlab think` and `llmlab chat` take --world), or calibrate it")
            model = self.engine.model
            if self.recall_path:
                model = checkpoint.load_model(self.recall_path, next(model.parameters()).device)
            self.recall = Recall(model, self.tok, world_lib.load(self.world))
        return self.recall

    def calibrated(self, probes: int, max_flagged: float = MAX_FLAGGED) -> float:
        """The threshold of verify at `probes` probes, calibrated on first use on the world's people
        (`calibration_names`)."""
        if probes not in self.thresholds:
            recall = self.recaller()
            self.calibrate(recall, calibration_names(recall.world), probes, max_flagged)
        return self.thresholds[probes]

    def calibrate(self, recall: Recall, known: list[str], probes: int, max_flagged: float = MAX_FLAGGED) -> float:
        """Set (and return) the threshold of verify at `probes` probes from names of known people."""
        self.recall = recall
        self.thresholds[probes] = calibrate(recall, known, probes, max_flagged)
        return self.thresholds[probes]

    # ---- sampling ------------------------------------------------------------------------------------------

    def sample(self, messages: list[dict], n: int, seed: int, temperature: float | None = None,
               lengths: list[int] | None = None) -> tuple[list[str], Compute]:
        """n replies; with `run_tool` the engine runs their tool calls and each reply is what `read` reads of its
        turn. `lengths`, when given, gets each reply's generated tokens."""
        prompt = render_prompt(self.tok, messages)
        params = SamplingParams(max_new_tokens=self.max_new_tokens, seed=seed,
                                temperature=self.temperature if temperature is None else temperature)
        if self.run_tool is None:
            replies = self.engine.generate([prompt] * n, params, self.reply_stops)
            texts = [self.tok.decode(r).strip() for r in replies]
        else:
            replies, _ = generate_with_tools(self.engine, self.tok, [prompt] * n, params, self.reply_stops, self.run_tool)
            texts = [self.read(messages, r).strip() for r in replies]
        generated = sum(map(len, replies))
        if lengths is not None:
            lengths.extend(map(len, replies))
        return texts, Compute(generated, len(prompt) + generated)

    # ---- verifiers -----------------------------------------------------------------------------------------

    def _reply_ids(self, messages: list[dict], text: str) -> list[int]:
        return render_conversation(self.tok, messages + self.as_reply(messages, text or self.give_up))[0]

    def _open_turn(self, messages: list[dict], text: str) -> list[int]:
        """The prompt and the reply so far, `text`, its turn left open to continue."""
        if not text:
            return render_prompt(self.tok, messages)
        ids = self._reply_ids(messages, text)
        return ids[:-1] if ids[-1] == self.tok.special_id("<|assistant_end|>") else ids

    def _verify(self, verifier: ModelReward, messages: list[dict], rows: list[list[int]]) -> list[float]:
        """A verifier's scores of replies to `messages` (rows of `_reply_ids`: the prompt, then the turn)."""
        return verifier.score(rows, [len(render_prompt(self.tok, messages))] * len(rows))

    def score(self, messages: list[dict], texts: list[str], strategy: str) -> tuple[list[float], list[int]]:
        """(each reply's score, tokens the verifier read for it): the outcome verifier's, or (prm) the process
        verifier's lowest score over the reply's prefixes of one, two, ... lines."""
        verifier = self.outcome if strategy == "orm" else self.process
        if verifier is None:
            kind = "outcome" if strategy == "orm" else "process"
            raise LLMLabError(f"strategy {strategy} needs {'an' if kind == 'outcome' else 'a'} {kind} verifier: "
                              f"train one with `llmlab rm --pairs puzzles:{kind}`")
        prefixes = [[t] if strategy == "orm" else step_prefixes(t) for t in texts]
        rows = [self._reply_ids(messages, p) for ps in prefixes for p in ps]
        flat = self._verify(verifier, messages, rows)
        scores, read, at = [], [], 0
        for ps in prefixes:
            scores.append(min(flat[at:at + len(ps)]))
            read.append(sum(len(r) for r in rows[at:at + len(ps)]))
            at += len(ps)
        return scores, read

    # ---- step-level search ---------------------------------------------------------------------------------

    def beam(self, messages: list[dict], budget: int, seed: int, expand: int = 4) -> Answer:
        if self.process is None:
            raise LLMLabError("beam search needs a process verifier: train one with `llmlab rm --pairs puzzles:process`")
        expand = min(expand, budget)
        width = max(budget // expand, 1)
        stops = self.line_stops + self.reply_stops
        beams, finished, compute = {"": 0.0}, {}, Compute()  # partial replies going on, with their scores
        room = self.engine.model.config.context_len - 1
        for depth in range(self.max_steps):
            opened = {b: self._open_turn(messages, b + "\n" if b else "") for b in beams}
            finished.update({b: beams[b] for b, ids in opened.items() if b and len(ids) >= room})  # (no room left)
            beams = {b: s for b, s in beams.items() if len(opened[b]) < room}
            if not beams:
                break
            bases = list(beams)
            prompts = [opened[b] for b in bases]
            params = SamplingParams(max_new_tokens=self.step_tokens, temperature=self.temperature,
                                    seed=seed + 7919 * depth)
            outs, _ = generate_with_tools(self.engine, self.tok, [p for p in prompts for _ in range(expand)], params,
                                          stops, self.run_tool, keep_stop=True)
            compute = compute.add(Compute(sum(map(len, outs)), sum(map(len, prompts)) + sum(map(len, outs))))
            candidates: dict[str, bool] = {}
            for i, out in enumerate(outs):
                ended = not out or out[-1] not in self.line_stops  # the reply's end, or the step's length ran out
                line = self.read(messages, [t for t in out if t not in self.reply_stops]).split("\n")[0].strip()
                base = bases[i // expand]
                text = f"{base}\n{line}" if base else line
                if line and text not in finished:
                    candidates[text] = candidates.get(text, False) or ended
            if not candidates:
                break
            texts = list(candidates)
            rows = [self._reply_ids(messages, t) for t in texts]
            scores = self._verify(self.process, messages, rows)
            compute = compute.add(Compute(scored=sum(map(len, rows))))
            going = {}
            for t, s in sorted(zip(texts, scores), key=lambda ts: -ts[1]):
                if candidates[t] or depth == self.max_steps - 1:
                    finished[t] = s
                elif len(going) < width:
                    going[t] = s
            beams = going
            if not beams:
                break
        ranked = sorted(finished.items(), key=lambda ts: -ts[1])
        return Answer(ranked[0][0] if ranked else self.give_up, compute, ranked)


def step_prefixes(text: str) -> list[str]:
    """A reply's first line, first two lines, ... (its partial attempts, as a process verifier reads them)."""
    lines = [line for line in text.strip().split("\n") if line.strip()]
    return ["\n".join(lines[:d + 1]) for d in range(len(lines))] or [""]

