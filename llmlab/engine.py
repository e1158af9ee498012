"""Inference: batched sampling with a KV cache, streaming, and the naive reference it is tested against.

`SamplingParams` is the one definition of the sampling settings: the stages, the API and the web UI build
theirs from it, each with its own defaults, and its checks are theirs.

`Engine.stream` prefills the prompts once, then decodes one token per step for every row, reading past keys
and values from an explicit `KVCache` instead of recomputing them. Rows with different prompt lengths are
left-padded (masked, with positions counted from each row's first real token), so every row computes what it
would alone. A row that stops leaves the batch (`Engine.live_steps`), and the tool calls of a batch run while it
decodes on (`generate_with_tools`). `generate_naive` recomputes the whole sequence at every step: slow, obviously
right, and the reference for the parity tests.
"""

from __future__ import annotations

import math
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from llmlab import threads as cpu_threads
from llmlab.errors import LLMLabError
from llmlab.model import GPT, GPTConfig, KVCache, apply_rotary
from llmlab.tokenizer import Tokenizer


TOOL_WORKERS = 4
"""tool calls of one batch that run at once in `generate_with_tools` by default (a sandboxed program is a
process of its own)"""

SEED_LIMIT = 2**63
"""seeds are in [0, SEED_LIMIT): a signed 64-bit integer, what torch's generators and SQLite keep exactly"""


class InvalidSampling(LLMLabError):
    """A sampling setting out of its range; `field` names it (the API reports it as the error's `param`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How each next token is picked: the one definition of the sampling settings, for the engine, the
    scheduler, `llmlab sample` and `llmlab chat` (`--sampling.temperature` ...), the API and the web UI.

    The defaults here are the engine's; each surface documents and sets its own in one place (the stage's
    `Config`, `llmlab.server.openai_api.DEFAULTS`, `llmlab.server.ui_api.DEFAULTS`). Every value is checked
    when the settings are made, so a bad one is a one-line error (a 422 in the API), never a crash later.
    """

    max_new_tokens: int = 64
    """most tokens to generate (fewer when the context fills up)"""
    temperature: float = 1.0
    """softmax temperature: below 1 sharpens the distribution, above 1 flattens it; 0 is greedy decoding
    (always the most likely token)"""
    top_k: int = 0
    """sample among the k most likely tokens only (0 = all tokens)"""
    top_p: float = 1.0
    """nucleus sampling: sample among the most likely tokens whose probabilities first reach top_p, in (0, 1]
    (1 = all tokens)"""
    seed: int = 0
    """seed of the random generator, in [0, 2**63): the same prompt, settings and seed give the same tokens"""

    def __post_init__(self) -> None:
        # every comparison with NaN is False: a NaN fails each of these checks
        checks = (
            ("max_new_tokens", self.max_new_tokens >= 0, "an integer >= 0"),
            ("temperature", 0 <= self.temperature < math.inf, "a finite number >= 0 (0 is greedy)"),
            ("top_k", self.top_k >= 0, "an integer >= 0 (0 = all tokens)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 = all tokens)"),
            ("seed", 0 <= self.seed < SEED_LIMIT, "in [0, 2**63)"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise InvalidSampling(name, f"{name} must be {rule}, got {getattr(self, name)!r}")


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,): greedy at temperature 0, else top-k / top-p filtered sampling.

    Sampling is by inverse CDF: one uniform number per row, located in the cumulative probabilities of the
    candidates (the top k when top_k is set). `torch.multinomial` draws one random number per vocabulary
    entry, which costs more than a whole decode step of a small model at batch 32.
    """
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
    return sample_with_uniform(logits, params, torch.rand(logits.size(0), 1, generator=generator, device=logits.device))


def sample_with_uniform(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor) -> torch.Tensor:
    """`sample_next` at temperature > 0 with its uniform numbers given, u (B, 1) in [0, 1): rows that draw
    from their own generators (the scheduler's requests) are then sampled in one batch."""
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, params.top_k, dim=-1)  # sorted, descending
    elif params.top_p < 1.0:
        logits, candidates = torch.sort(logits, descending=True, dim=-1)
    else:
        candidates = None
    probs = logits.softmax(dim=-1)
    if params.top_p < 1.0:  # candidates are sorted: drop a token once the tokens before it reach top_p
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= params.top_p, 0.0)
    cdf = probs.cumsum(dim=-1)
    u = u * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)
    while True:  # never land on a zero-probability token (u at a plateau's edge, or rounding at the top)
        bad = probs.gather(-1, choice) == 0
        if not bool(bad.any()):
            break
        choice = torch.where(bad, choice - 1, choice)
    choice = choice.squeeze(-1)
    return choice if candidates is None else candidates.gather(-1, choice[:, None]).squeeze(-1)


def _generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0.0:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def newline_ids(tokenizer: Tokenizer) -> list[int]:
    """Every token whose text contains a newline: stop ids that end a completion with its line (`Q: ... A:`
    prompts, answers of one line)."""
    return [i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i])]


def reply_room(prompts: Sequence[Sequence[int]], params: SamplingParams, context_len: int,
               budgets: Sequence[int] | None = None) -> list[int]:
    """The most new tokens each row may generate: its budget (`budgets[i]`, default `params.max_new_tokens`) and
    no more than its own prompt leaves of the context. A reply as long as its room was cut off."""
    _check_prompts(prompts, context_len)
    if budgets is None:
        budgets = [params.max_new_tokens] * len(prompts)
    elif len(budgets) != len(prompts) or any(b < 0 for b in budgets):
        raise LLMLabError(f"budgets: one integer >= 0 per prompt ({len(prompts)} prompts, got {list(budgets)})")
    return [min(b, context_len - len(p)) for p, b in zip(prompts, budgets)]


def _check_prompts(prompts: Sequence[Sequence[int]], context_len: int) -> None:
    if not prompts:
        raise LLMLabError("no prompts given")
    for p in prompts:
        if len(p) == 0:
            raise LLMLabError("empty prompt: give at least one token (e.g. <|bos|>)")
        if len(p) >= context_len:
            raise LLMLabError(f"prompt of {len(p)} tokens does not fit the model's context of {context_len}: shorten it")


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for x (B, d_in). A single row on CPU is written as multiply-and-sum over d_in: inductor
    turns it into a loop that streams the (d_out, d_in) weight at about memory bandwidth and fuses it with the
    norms and activations around it, where an extern MKL gemv on that layout reads at half the speed."""
    if x.size(0) == 1 and x.device.type == "cpu":
        return (x[:, None, :] * weight).sum(-1)
    return F.linear(x, weight)


def _decode_layout(cfg: GPTConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Name and shape of every tensor `decode_step` reads, in the order it reads them."""
    d, D, F_ = cfg.d_model, cfg.hdim, cfg.ffn
    layout = [("embed", (cfg.vocab_size, d)), ("cos", (cfg.context_len, D)), ("sin", (cfg.context_len, D))]
    for i in range(cfg.n_layer):
        layer = [("ln1", (d,)), ("q", (cfg.n_head * D, d)), ("k", (cfg.n_kv_head * D, d)), ("v", (cfg.n_kv_head * D, d))]
        layer += [("q_norm", (D,)), ("k_norm", (D,))] if cfg.qk_norm else []
        layer += [("o", (d, cfg.n_head * D)), ("ln2", (d,)), ("gate", (F_, d)), ("up", (F_, d)), ("down", (d, F_))]
        layout += [(f"{i}.{name}", shape) for name, shape in layer]
    return layout + [("norm", (d,)), ("head", (cfg.vocab_size, d))]


def _model_tensors(model: GPT) -> list[torch.Tensor]:
    """The model's tensors in `_decode_layout` order."""
    tensors = [model.embed_tokens.weight, model.rotary.cos, model.rotary.sin]
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        tensors += [block.input_layernorm.weight, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        tensors += [attn.q_norm.weight, attn.k_norm.weight] if attn.q_norm is not None else []
        tensors += [attn.o_proj.weight, block.post_attention_layernorm.weight, mlp.gate_proj.weight,
                    mlp.up_proj.weight, mlp.down_proj.weight]
    return tensors + [model.norm.weight, model.lm_head.weight]


class DecodeWeights:
    """A copy of every tensor `decode_step` reads, packed into one flat buffer in the order it reads them.

    A compiled call pays for each tensor argument (dynamo's guards and argument handling, a few microseconds
    per tensor on a CPU: a real share of a small model's decode step, which reads some 60 tensors); one buffer
    is one argument, and the step slices its weights at fixed offsets. `is_stale` tells when the model changed
    since the copy (a parameter replaced, or updated in place: version counters), so that an Engine can keep
    serving a model that trains between calls.
    """

    def __init__(self, model: GPT):
        self.config = model.config
        sources = _model_tensors(model)
        self._stamp = [(t, t._version) for t in sources]
        with torch.no_grad():
            self.flat = torch.cat([t.detach().reshape(-1) for t in sources])

    def is_stale(self, model: GPT) -> bool:
        sources = _model_tensors(model)
        return len(sources) != len(self._stamp) or any(
            t is not old or t._version != version for t, (old, version) in zip(sources, self._stamp))

    def unpack(self) -> dict[str, torch.Tensor]:
        views, offset = {}, 0
        for name, shape in _decode_layout(self.config):
            n = math.prod(shape)
            views[name] = self.flat[offset:offset + n].view(shape)
            offset += n
        return views


def decode_step(weights: DecodeWeights, ids: torch.Tensor, cache: KVCache, key_pos: torch.Tensor) -> torch.Tensor:
    """`GPT.forward` of one new token per row, written for torch.compile: ids (B,) -> fp32 logits (B, V).

    The same math as the model on a copy of its weights (`DecodeWeights`), written so that one compiled graph
    serves every step: the step number arrives as `key_pos = arange(length + 1)`, a tensor whose length is a
    dynamic dimension (`KVCache.write_at`), and attention of the single query is multiply-and-sum and softmax,
    which inductor fuses with its neighbours. The caller calls `cache.advance(1)`.
    """
    cfg, w = weights.config, weights.unpack()
    B, Hkv, D, eps = ids.size(0), cfg.n_kv_head, cfg.hdim, cfg.norm_eps
    G = cfg.n_head // Hkv  # query heads per key/value head

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), weight, eps)

    pos = cache.row_positions(key_pos[-1:])  # (1,) or (B, 1)
    cos, sin = w["cos"][pos], w["sin"][pos]  # (1, D) or (B, 1, D)
    keep = None if cache.pad_lens is None else (key_pos[None, :] >= cache.pad_lens[:, None])[:, None, None, :]
    x = w["embed"][ids]  # (B, d)
    for i in range(cfg.n_layer):
        h = norm(x, w[f"{i}.ln1"])
        q = _linear(h, w[f"{i}.q"]).view(B, Hkv * G, D)
        k = _linear(h, w[f"{i}.k"]).view(B, Hkv, D)
        v = _linear(h, w[f"{i}.v"]).view(B, Hkv, D)
        if cfg.qk_norm:
            q, k = norm(q, w[f"{i}.q_norm"]), norm(k, w[f"{i}.k_norm"])
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys, values = cache.write_at(i, key_pos, k, v)  # (B, Hkv, L, D)
        scores = (q.view(B, Hkv, G, 1, D) * keys[:, :, None]).sum(-1) * D**-0.5  # (B, Hkv, G, L)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = scores.float().softmax(-1).to(values.dtype)
        y = (probs[..., None] * values[:, :, None]).sum(-2)  # (B, Hkv, G, D)
        x = x + _linear(y.reshape(B, Hkv * G * D), w[f"{i}.o"])
        h = norm(x, w[f"{i}.ln2"])
        x = x + _linear(F.silu(_linear(h, w[f"{i}.gate"])) * _linear(h, w[f"{i}.up"]), w[f"{i}.down"])
    return _linear(norm(x, w["norm"]), w["head"]).float()


class Engine:
    """Batched generation for one model. Holds no state between calls: each call builds its own KVCache.

    compile=True decodes with `decode_step` compiled by torch.compile (inductor) instead of the eager
    `GPT.forward`: the same logits up to float rounding, several times faster at batch 1 on CPU, after a
    one-off compile of tens of seconds per process (a second graph for batches of more than one row). Prompts
    are always prefilled eagerly. The compiled step reads a packed copy of the weights (`DecodeWeights`),
    refreshed at the start of a call when the model has changed.
    """

    # Inductor's Python wrapper checks the size and alignment of every intermediate buffer on every call, a
    # cost per token comparable to a small model's whole step; the graph's shapes are fixed at compile time, so
    # the checks catch nothing.
    _COMPILE_OPTIONS = {"size_asserts": False, "alignment_asserts": False}

    def __init__(self, model: GPT, compile: bool = False):
        if model.config.num_labels:
            raise LLMLabError("this checkpoint is a scorer (a reward model: num_labels > 0), not a language model: "
                              "it scores text but cannot generate it; give an assistant or base checkpoint")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._compiled_step = torch.compile(decode_step, dynamic=False, options=self._COMPILE_OPTIONS) if compile else None
        self._weights: DecodeWeights | None = None

    def _decode(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, V) after appending one token per row to the cache."""
        if self._compiled_step is None:
            return self.model(tokens[:, None], cache)[:, -1]
        key_pos = torch.arange(cache.length + 1, device=self.device)
        torch._dynamo.mark_dynamic(key_pos, 0)
        if cache.batch_size > 1:
            torch._dynamo.mark_dynamic(tokens, 0)
        logits = self._compiled_step(self._weights, tokens, cache, key_pos)
        cache.advance(1)
        return logits

    def _prepare_compiled(self, cache: KVCache) -> None:
        """Refresh the packed weights if the model changed, and mark the dimensions of the cache that change
        between calls as dynamic, so that one graph serves every length (and every batch above one row)."""
        if self._weights is None or self._weights.is_stale(self.model):
            self._weights = DecodeWeights(self.model)
        for buf in (cache.k, cache.v):
            torch._dynamo.mark_dynamic(buf, 3)
            if cache.batch_size > 1:
                torch._dynamo.mark_dynamic(buf, 1)
        if cache.pad_lens is not None:
            torch._dynamo.mark_dynamic(cache.pad_lens, 0)

    def steps(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
              choose: Callable[..., torch.Tensor] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (tokens (B,), logits (B, V)) for every new position: each row's sampled token and the fp32
        logits it was sampled from, until max_new_tokens or the context is full. No stop handling here.
        `choose(tokens, rows)`, when given, maps the sampled tokens to the tokens actually appended (forced tool
        output; `ToolCalls`)."""
        for _, tokens, logits in self.live_steps(prompts, params, choose):
            yield tokens, logits

    # A batch drops its stopped rows once no more than this share of its rows is still running: each drop copies
    # the cache, so dropping at every stop would cost more than decoding the stopped rows a few steps longer
    # (0: never, every row decodes to the end; bench/b7_rl.py measures both).
    COMPACT_AT = 0.75

    @torch.inference_mode()
    def live_steps(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                   choose: Callable[..., torch.Tensor] | None = None,
                   stopped: Callable[[list[int], torch.Tensor], list[bool]] | None = None,
                   budgets: Sequence[int] | None = None) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """`steps` for rows that stop at different times. Yield (rows, tokens, logits) for the rows still
        running: their indices in `prompts`, the token each appends and the logits it was sampled from. After
        each step `stopped(rows, tokens)` says which of them have just stopped; they are never yielded again, and
        once at most `COMPACT_AT` of the batch still runs their keys and values leave the cache, so a batch costs
        about what its running rows cost (the replies of one batch end at very different lengths: in the
        alignment stages' sampling about two thirds of a batch's row-steps were rows that had already stopped).
        `choose(tokens, rows)` maps the running rows' sampled tokens to the tokens they append. Each row stops
        after its own room (`reply_room`): `budgets[i]` tokens (default `params.max_new_tokens`), and no more than
        its own prompt leaves of the context, so a short prompt is not cut short by a long one beside it."""
        cfg = self.model.config
        room = reply_room(prompts, params, cfg.context_len, budgets)
        longest = max(len(p) for p in prompts)
        max_new = max(room)
        if max_new <= 0:
            return
        B = len(prompts)
        gen = _generator(params, self.device)
        if all(list(p) == list(prompts[0]) for p in prompts):
            # The same prompt for every row (several samples): prefill once at batch 1, then copy the cache.
            cache = KVCache(cfg, 1, longest + max_new, dtype=self.dtype, device=self.device)
            ids = torch.tensor([list(prompts[0])], device=self.device)
            logits = self.model(ids, cache)[:, -1].expand(B, -1)
            cache = cache.expand(B) if B > 1 else cache
        else:
            pad_lens = torch.tensor([longest - len(p) for p in prompts], device=self.device)
            cache = KVCache(cfg, B, longest + max_new, pad_lens=pad_lens, dtype=self.dtype, device=self.device)
            ids = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=self.device)
            logits = self.model(ids, cache)[:, -1]
        if self._compiled_step is not None:
            self._prepare_compiled(cache)
        rows = list(range(B))  # the prompt of each row of the cache
        running = [r > 0 for r in room]
        for i in range(max_new):
            cpu_threads.adapt()
            token = sample_next(logits, params, gen)  # (rows of the cache,)
            at = [j for j, r in enumerate(running) if r]
            live = [rows[j] for j in at]
            if len(at) < len(rows):
                index = torch.tensor(at, device=self.device)
                live_tokens, live_logits = token.index_select(0, index), logits.index_select(0, index)
            else:
                index, live_tokens, live_logits = None, token, logits
            if choose is not None:
                live_tokens = choose(live_tokens, live)
                token = live_tokens if index is None else token.index_copy(0, index, live_tokens)
            yield live, live_tokens, live_logits
            if stopped is not None:
                for j, done in zip(at, stopped(live, live_tokens)):
                    running[j] = running[j] and not done
            for j in at:  # a row that has used its room
                running[j] = running[j] and i + 1 < room[rows[j]]
            n = sum(running)
            if n == 0:
                return
            # the next step writes the token of step i at position len(prompt) + i of each row: a stopped row past
            # the end of the context must leave the cache first
            overflow = any(not r and len(prompts[rows[j]]) + i >= cfg.context_len for j, r in enumerate(running))
            if n <= self.COMPACT_AT * len(rows) or overflow:
                keep = [j for j, r in enumerate(running) if r]
                index = torch.tensor(keep, device=self.device)
                cache.select(index)
                token = token.index_select(0, index)
                rows, running = [rows[j] for j in keep], [True] * n
                if self._compiled_step is not None:
                    self._prepare_compiled(cache)
            logits = self._decode(token, cache)

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
               stop_ids: Sequence[int] = ()) -> Iterator[list[int | None]]:
        """Yield, at every step, the new token of each row, or None for a row that has already stopped.

        A row stops after it emits a token in `stop_ids` (that token is yielded) or when the context is full;
        generation ends when every row has stopped.
        """
        stops = set(stop_ids)
        for rows, tokens, _ in self.live_steps(prompts, params,
                                               stopped=lambda _, tokens: [t in stops for t in tokens.tolist()]):
            column: list[int | None] = [None] * len(prompts)
            for row, t in zip(rows, tokens.tolist()):
                column[row] = t
            yield column

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 stop_ids: Sequence[int] = (), keep_stop: bool = False) -> list[list[int]]:
        """The new tokens of each row, without the stop token that ended it (with it: keep_stop, for callers
        with several kinds of stop, such as the end of a line or of the reply)."""
        out: list[list[int]] = [[] for _ in prompts]
        stops = set(stop_ids)
        finished = [False] * len(prompts)
        for column in self.stream(prompts, params, stop_ids):
            for row, token in enumerate(column):
                if token is None or finished[row]:
                    continue
                finished[row] = token in stops
                if keep_stop or not finished[row]:
                    out[row].append(token)
        return out


class ToolCalls:
    """The tool-call state machine of one batch, for `Engine.steps(choose=...)`.

    A row that writes `<|tool_start|>` is collecting a call; at `<|tool_end|>` the call's text ("name args")
    goes to `run_tool`, and the row's next tokens are forced: `<|output_start|>`, the result's tokens,
    `<|output_end|>`; then the row samples again. `forced[row]` marks which of the row's tokens were forced
    (masked from losses later, e.g. in RL). Special tokens are ids, so text in a tool's output that looks like
    a special token stays text.

    With `defer=True` a finished call is not run here: its text waits in `ready[row]` until the caller runs the
    tool elsewhere and hands the result to `deliver(row, result)` (the serving scheduler does this, so that a
    slow tool does not hold up the other rows of its batch).

    With a `pool` (an Executor), a finished call starts in the pool and the row appends `<|output_start|>`
    meanwhile; the result is awaited only when its tokens are due, a step later. The calls that rows of a batch
    finish close together run at the same time and beside the model's decode step: a sandboxed python call costs
    about as much as two decode steps of a batch of a hundred rows, and sampling the world's python tasks makes
    one for nearly every reply.
    """

    def __init__(self, tokenizer, batch_size: int, run_tool: Callable[[str], str], defer: bool = False,
                 pool: Executor | None = None):
        self.tok, self.run_tool, self.defer, self.pool = tokenizer, run_tool, defer, pool
        self.running: dict[int, tuple[str, Future]] = {}  # row -> (call, its result to come), with a pool
        self.ready: list[str | None] = [None] * batch_size  # deferred calls awaiting their result
        self.start, self.end = tokenizer.special_id("<|tool_start|>"), tokenizer.special_id("<|tool_end|>")
        self.out_start, self.out_end = tokenizer.special_id("<|output_start|>"), tokenizer.special_id("<|output_end|>")
        self.call: list[list[int] | None] = [None] * batch_size  # tokens of the call being written
        self.queue: list[list[int]] = [[] for _ in range(batch_size)]  # forced tokens still to come
        self.forced: list[list[bool]] = [[] for _ in range(batch_size)]
        self.calls: list[list[tuple[str, str]]] = [[] for _ in range(batch_size)]  # (call, result) per row

    def __call__(self, sampled: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """The tokens appended for `sampled`, the tokens sampled for `rows` (default: every row, in order)."""
        out = sampled.tolist()
        rows = range(len(out)) if rows is None else rows
        for row in rows:
            if row in self.running and not self.queue[row]:  # its `<|output_start|>` is in: the result is due
                self.queue[row] = self.tok.encode(self._collect(row)) + [self.out_end]
        for i, (row, token) in enumerate(zip(rows, out)):
            if self.queue[row]:
                out[i] = self.queue[row].pop(0)
                self.forced[row].append(True)
                continue
            self.forced[row].append(False)
            if token == self.start:
                self.call[row] = []
            elif token == self.end and self.call[row] is not None:
                text = self.tok.decode(self.call[row]).strip()
                self.call[row] = None
                if self.pool is not None:
                    self.running[row] = (text, self.pool.submit(self.run_tool, text))
                    self.queue[row] = [self.out_start]
                    continue
                self.ready[row] = text
                if not self.defer:
                    self.deliver(row, self.run_tool(text))
            elif self.call[row] is not None:
                self.call[row].append(token)
        return torch.tensor(out, dtype=sampled.dtype, device=sampled.device)

    def settle(self) -> None:
        """Wait for the calls still running (the length limit ended their rows first) and record them in `calls`."""
        for row in sorted(self.running):
            self._collect(row)

    def _collect(self, row: int) -> str:
        """Wait for the row's call running in the pool; record it in `calls` and return its result."""
        text, future = self.running.pop(row)
        result = future.result()
        self.calls[row].append((text, result))
        return result

    def deliver(self, row: int, result: str) -> None:
        """The result of the row's finished call (`ready[row]`): its tokens are forced next."""
        text, self.ready[row] = self.ready[row], None
        if text is None:
            raise LLMLabError(f"deliver: row {row} has no finished tool call")
        self.calls[row].append((text, result))
        self.queue[row] = [self.out_start] + self.tok.encode(result) + [self.out_end]


def generate_with_tools(engine: Engine, tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams,
                        stop_ids: Sequence[int], run_tool: Callable[[str], str] | None,
                        keep_stop: bool = False,
                        tool_workers: int = TOOL_WORKERS) -> tuple[list[list[int]], ToolCalls | None]:
    """Generate with tool calls run by `run_tool` (None: no tools; a call is then written but never answered).
    Returns each row's new tokens (tool outputs included, the stop token excluded unless `keep_stop`) and the
    state machine (its `forced` masks and `calls`). A token forced as a tool's output never stops a row. Up to
    `tool_workers` calls run at once (0: each in turn, the batch waiting on it)."""
    pool = ThreadPoolExecutor(tool_workers, thread_name_prefix="tool") if run_tool and tool_workers else None
    tools = ToolCalls(tokenizer, len(prompts), run_tool, pool=pool) if run_tool is not None else None
    out: list[list[int]] = [[] for _ in prompts]
    stops = set(stop_ids)

    def stopped(rows: list[int], tokens: torch.Tensor) -> list[bool]:
        flags = []
        for row, t in zip(rows, tokens.tolist()):
            done = t in stops and not (tools is not None and tools.forced[row][-1])
            if keep_stop or not done:
                out[row].append(t)
            flags.append(done)
        return flags

    try:
        for _ in engine.live_steps(prompts, params, choose=tools, stopped=stopped):
            pass
        if tools is not None:
            tools.settle()
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    return out, tools


@torch.inference_mode()
def generate_naive(model: GPT, prompt: Sequence[int], params: SamplingParams,
                   stop_ids: Sequence[int] = ()) -> tuple[list[int], list[torch.Tensor]]:
    """The reference: re-run the full sequence for every new token. Returns (new tokens, last-position logits
    at each step), stopping after a token in stop_ids (included) or when the context is full."""
    cfg = model.config
    _check_prompts([prompt], cfg.context_len)
    device = next(model.parameters()).device
    gen = _generator(params, device)
    ids = list(prompt)
    new, all_logits = [], []
    for _ in range(min(params.max_new_tokens, cfg.context_len - len(prompt))):
        logits = model(torch.tensor([ids], device=device))[:, -1]
        all_logits.append(logits[0])
        token = int(sample_next(logits, params, gen)[0])
        new.append(token)
        ids.append(token)
        if token in stop_ids:
            break
    return new, all_logits
