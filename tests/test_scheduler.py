"""Continuous batching: requests that join and leave a running batch compute what they would alone."""

import queue
import threading
import time

import pytest
import torch

from llmlab.engine import Engine, SamplingParams, generate_naive
from llmlab.errors import LLMLabError
from llmlab.model import GPT, GPTConfig, KVCache
from llmlab.scheduler import Event, Scheduler, SchedulerDown, SlotKVCache
from serving import FaultyModel

CFG = GPTConfig(vocab_size=97, n_layer=2, d_model=32, n_head=4, n_kv_head=2, context_len=64, qk_norm=True)


def _model(seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(CFG)
    model.init_weights(seed=seed)
    with torch.no_grad():  # o_proj/down_proj start at zero: give every layer a say
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


class Collector:
    """on_event callback that gathers a request's tokens, logprobs and finish reason."""

    def __init__(self):
        self.tokens, self.forced, self.logprobs, self.finish = [], [], [], None
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        if event.token is None:
            self.finish = event.finish
            self.done.set()
        else:
            self.tokens.append(event.token)
            self.forced.append(event.forced)
            if event.logprobs is not None:
                self.logprobs.append(event.logprobs)

    def wait(self, timeout=60):
        assert self.done.wait(timeout), "request did not finish"
        return self


def test_slot_cache_rows_compute_what_they_would_alone():
    """Three rows of different lengths decoded together through GPT.forward = each row alone."""
    model = _model()
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4]]
    slots = SlotKVCache(CFG, 4)
    for row, p in enumerate(prompts):
        single = KVCache(CFG, 1, len(p))
        model(torch.tensor([p]), single)
        slots.insert(row, single)
    slots.n = 3
    nxt = torch.tensor([[20], [21], [22]])
    batched = model(nxt, slots)[:, -1]
    assert slots.lengths[:3].tolist() == [4, 8, 2]
    for row, p in enumerate(prompts):
        alone = model(torch.tensor([p + [20 + row]]))[0, -1]
        torch.testing.assert_close(batched[row], alone, atol=1e-5, rtol=1e-5)


def test_staggered_greedy_requests_match_the_engine():
    """Requests arriving while others decode give the engine's greedy tokens, row by row."""
    model = _model()
    engine = Engine(model)
    prompts = [[1, 2, 3, 4], [9, 8], [30, 31, 32, 33, 34, 35, 36], [50], [7, 7, 7]]
    budgets = [20, 7, 15, 30, 3]
    scheduler = Scheduler(model, tokenizer=None, max_batch=3)  # fewer rows than requests: some wait
    try:
        collectors = []
        for p, n in zip(prompts, budgets):
            c = Collector()
            scheduler.submit(p, SamplingParams(max_new_tokens=n, temperature=0.0), c, logprobs=True)
            collectors.append(c)
            time.sleep(0.01)
        for p, n, c in zip(prompts, budgets, collectors):
            c.wait()
            expected, logits = generate_naive(model, p, SamplingParams(max_new_tokens=n, temperature=0.0))
            assert c.tokens == expected and c.finish == "length"
            for lp, ref in zip(c.logprobs, logits):
                torch.testing.assert_close(lp, torch.log_softmax(ref, -1), atol=1e-4, rtol=1e-4)
        assert scheduler.active == 0
        assert scheduler.batch_sizes_total > scheduler.steps  # rows really were batched
    finally:
        scheduler.shutdown()


def test_stop_tokens_context_limit_and_seeded_sampling():
    model = _model()
    engine = Engine(model)
    scheduler = Scheduler(model, tokenizer=None, max_batch=4)
    try:
        greedy = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=10, temperature=0.0))[0]
        stop = greedy[4]
        c = Collector()
        scheduler.submit([1, 2, 3], SamplingParams(max_new_tokens=10, temperature=0.0), c, stop_ids=[stop])
        assert c.wait().finish == "stop" and c.tokens == greedy[: greedy.index(stop) + 1]

        long_prompt = list(range(1, 60))  # 59 tokens of a 64-token context: 5 new tokens at most
        c = Collector()
        scheduler.submit(long_prompt, SamplingParams(max_new_tokens=50, temperature=0.0), c)
        assert c.wait().finish == "length" and len(c.tokens) == 5

        params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, seed=123)
        a, b = Collector(), Collector()
        scheduler.submit([4, 5], params, a)
        scheduler.submit([4, 5], params, b)
        assert a.wait().tokens == b.wait().tokens  # same seed, same tokens, whatever shares the batch
        assert a.tokens == engine.generate([[4, 5]], params)[0]
    finally:
        scheduler.shutdown()


def test_cancel_frees_the_row_and_others_continue():
    model = _model()
    scheduler = Scheduler(model, tokenizer=None, max_batch=1)
    try:
        events = queue.Queue()
        handle = scheduler.submit([1, 2], SamplingParams(max_new_tokens=60, temperature=0.0), events.put)
        events.get(timeout=30)  # it is running
        waiting = Collector()
        scheduler.submit([3, 4], SamplingParams(max_new_tokens=4, temperature=0.0), waiting)
        handle.cancel()
        while (event := events.get(timeout=30)).token is not None:
            pass
        assert event.finish == "cancelled"
        assert waiting.wait().finish == "length" and len(waiting.tokens) == 4  # the freed row served it
    finally:
        scheduler.shutdown()


def test_bad_prompts_fail_at_submit_and_a_failing_consumer_does_not_stop_the_loop():
    model = _model()
    scheduler = Scheduler(model, tokenizer=None, max_batch=2)
    try:
        with pytest.raises(LLMLabError, match="context"):
            scheduler.submit(list(range(64)), SamplingParams(), lambda e: None)
        with pytest.raises(LLMLabError, match="empty prompt"):
            scheduler.submit([], SamplingParams(), lambda e: None)

        def broken(event):
            raise RuntimeError("client went away")

        scheduler.submit([1, 2], SamplingParams(max_new_tokens=30, temperature=0.0), broken)
        c = Collector()
        scheduler.submit([5, 6], SamplingParams(max_new_tokens=5, temperature=0.0), c)
        assert c.wait().finish == "length" and len(c.tokens) == 5
        assert scheduler.call(lambda m: m.config.vocab_size).result(timeout=30) == 97
    finally:
        scheduler.shutdown()


def test_min_new_tokens_masks_the_stop_tokens_until_reached():
    model = _model()
    engine = Engine(model)
    greedy = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=10, temperature=0.0))[0]
    stop = greedy[1]
    scheduler = Scheduler(model, tokenizer=None, max_batch=2)
    try:
        c = Collector()
        scheduler.submit([1, 2, 3], SamplingParams(max_new_tokens=10, temperature=0.0), c, stop_ids=[stop],
                         min_new_tokens=6)
        c.wait()
        assert stop not in c.tokens[:6] and c.tokens[0] == greedy[0]
    finally:
        scheduler.shutdown()


def test_a_slow_tool_call_waits_outside_the_batch(tmp_path):
    """While one request's tool runs (blocked here until released), the others keep decoding; the parked
    request then rejoins with its cache restored and ends as it would have alone."""
    from serving import ScriptModel, calculator_script, make_tokenizer

    from llmlab.chat import render_prompt
    from llmlab.engine import generate_with_tools
    from llmlab.tokenizer import Tokenizer
    from llmlab.tools import run_tool

    tok = Tokenizer.load(make_tokenizer(tmp_path))
    model = ScriptModel(tok.vocab_size, calculator_script(tok))
    end = tok.special_id("<|assistant_end|>")
    calculate = lambda call: run_tool(call).text  # noqa: E731
    release, calls = threading.Event(), []

    def slow_calculator(call: str) -> str:
        calls.append(call)
        assert release.wait(30), "never released"
        return calculate(call)

    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    asks = {q: render_prompt(tok, [{"role": "user", "content": q}]) for q in ("What is 6 * 7?", "Hi", "What is 2 + 3?")}
    scheduler = Scheduler(model, tok, max_batch=2)
    try:
        slow = Collector()
        scheduler.submit(asks["What is 6 * 7?"], params, slow, stop_ids=[end], run_tool=slow_calculator)
        deadline = time.monotonic() + 30
        while scheduler.parked == 0:
            assert time.monotonic() < deadline and not slow.done.is_set()
            time.sleep(0.01)
        others = [Collector(), Collector()]  # both rows free for them: the parked request holds none
        scheduler.submit(asks["Hi"], params, others[0], stop_ids=[end])
        scheduler.submit(asks["What is 2 + 3?"], params, others[1], stop_ids=[end], run_tool=calculate)
        assert others[0].wait().finish == "stop" and others[1].wait().finish == "stop"
        assert not slow.done.is_set() and calls == ["calculator 6 * 7"]
        release.set()
        assert slow.wait().finish == "stop"
    finally:
        release.set()
        scheduler.shutdown()
    engine = Engine(model)
    for question, got in zip(asks, [slow, *others]):
        expected, tools = generate_with_tools(engine, tok, [asks[question]], params, [end], calculate)
        assert got.tokens[:-1] == expected[0] and got.tokens[-1] == end
        assert got.forced[:-1] == tools.forced[0][: len(expected[0])]
    assert "It is 42." in tok.decode(slow.tokens) and "It is 5." in tok.decode(others[1].tokens)


# ---- faults: a failing request ends alone; a failing loop says so and answers everyone ---------------------------


def _greedy(n=6) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


def test_a_seed_the_generator_refuses_fails_that_request_alone():
    """The bug of issue 18: seed 2**64 killed the loop in torch's manual_seed and every later request hung. Made
    here past SamplingParams' own check, as a request that slipped through the server's validation would be."""
    model = _model()
    scheduler = Scheduler(model, tokenizer=None, max_batch=4)
    try:
        bad = SamplingParams(max_new_tokens=6, temperature=1.0)
        object.__setattr__(bad, "seed", 2**64)
        doomed, fine = Collector(), Collector()
        scheduler.submit([1, 2], bad, doomed)
        scheduler.submit([3, 4], _greedy(), fine)
        assert doomed.wait(10).finish.startswith("error: ") and doomed.tokens == []
        assert fine.wait(10).finish == "length" and len(fine.tokens) == 6
        later = Collector()
        scheduler.submit([5], _greedy(3), later)
        assert later.wait(10).finish == "length" and scheduler.alive and scheduler.failure is None
    finally:
        scheduler.shutdown()


def test_a_row_whose_sampling_raises_ends_alone(monkeypatch):
    import llmlab.scheduler as scheduler_module

    real = scheduler_module.sample_with_uniform

    def sample(logits, params, u):
        if params.top_k == 13:
            raise RuntimeError("sampler exploded")
        return real(logits, params, u)

    monkeypatch.setattr(scheduler_module, "sample_with_uniform", sample)
    model = _model()
    scheduler = Scheduler(model, tokenizer=None, max_batch=4)
    try:
        seeded = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=5, seed=3)
        doomed, greedy, sampled = Collector(), Collector(), Collector()
        scheduler.submit([1, 2], SamplingParams(max_new_tokens=8, temperature=1.0, top_k=13), doomed)
        scheduler.submit([3, 4], _greedy(8), greedy)
        scheduler.submit([4, 5], seeded, sampled)
        assert "sampler exploded" in doomed.wait(10).finish
        assert greedy.wait(10).tokens == Engine(model).generate([[3, 4]], _greedy(8))[0]
        assert sampled.wait(10).tokens == Engine(model).generate([[4, 5]], seeded)[0]  # its generator untouched
    finally:
        scheduler.shutdown()


def test_a_prompt_whose_prefill_raises_fails_alone():
    """Prompts are prefilled together; when that forward raises they are prefilled again one by one."""
    model = _model()
    faulty = FaultyModel(model, lambda ids, cache: ids.size(1) > 1 and bool((ids == 96).any()))
    scheduler = Scheduler(faulty, tokenizer=None, max_batch=4)
    try:
        scheduler.call(lambda m: time.sleep(0.2))  # the three requests queue up behind it: one admission
        doomed, a, b = Collector(), Collector(), Collector()
        scheduler.submit([1, 96], _greedy(), doomed)
        scheduler.submit([1, 2, 3], _greedy(), a)
        scheduler.submit([7], _greedy(), b)
        assert "injected fault" in doomed.wait(10).finish
        assert a.wait(10).tokens == Engine(model).generate([[1, 2, 3]], _greedy())[0]
        assert b.wait(10).tokens == Engine(model).generate([[7]], _greedy())[0]
    finally:
        scheduler.shutdown()


def test_a_failing_decode_step_ends_its_batch_and_the_loop_goes_on():
    model = _model()
    broken = threading.Event()
    faulty = FaultyModel(model, lambda ids, cache: broken.is_set() and ids.size(1) == 1)  # decode steps only
    scheduler = Scheduler(faulty, tokenizer=None, max_batch=4)
    try:
        events = queue.Queue()
        scheduler.submit([1, 2], SamplingParams(max_new_tokens=50, temperature=0.0), events.put)
        events.get(timeout=10)
        broken.set()
        while (event := events.get(timeout=10)).token is not None:
            pass
        assert "injected fault" in event.finish
        broken.clear()
        later = Collector()
        scheduler.submit([3, 4], _greedy(), later)
        assert later.wait(10).tokens == Engine(model).generate([[3, 4]], _greedy())[0]
        assert scheduler.alive
    finally:
        scheduler.shutdown()


def test_a_loop_that_keeps_failing_dies_loudly_and_nothing_waits_on_it():
    """`max_failures` failing iterations in a row: the loop stops, every request it held or that waited ends
    with an error at once, `alive` is False, `on_death` hears why, and new work is refused at once."""
    model = _model()
    faulty = FaultyModel(model, lambda ids, cache: ids.size(1) == 1)  # every decode step raises
    scheduler = Scheduler(faulty, tokenizer=None, max_batch=1, max_failures=2)
    died = []
    scheduler.on_death = died.append
    try:
        collectors = [Collector() for _ in range(4)]
        for i, c in enumerate(collectors):  # one row: the later requests wait in the queue
            scheduler.submit([1 + i, 2], _greedy(), c)
        for c in collectors:
            assert c.wait(10).finish.startswith("error: ")
        deadline = time.monotonic() + 10
        while scheduler.alive:
            assert time.monotonic() < deadline, "the loop did not stop"
            time.sleep(0.01)
        assert isinstance(scheduler.failure, RuntimeError) and died == [scheduler.failure]
        assert "internal error" in collectors[-1].finish  # a waiting request: answered by the dying loop
        with pytest.raises(SchedulerDown, match="injected fault"):
            scheduler.submit([1], _greedy(), Collector())
        with pytest.raises(SchedulerDown):
            scheduler.call(lambda m: None)
    finally:
        scheduler.shutdown()


def test_shutdown_is_bounded_by_its_timeout_even_with_a_tool_call_that_never_returns(tmp_path):
    """A tool call that hangs holds neither the loop nor the process (the pool's threads are daemons); its
    request ends "cancelled"."""
    from serving import ScriptModel, calculator_script, make_tokenizer

    from llmlab.chat import render_prompt
    from llmlab.tokenizer import Tokenizer

    tok = Tokenizer.load(make_tokenizer(tmp_path))
    model = ScriptModel(tok.vocab_size, calculator_script(tok))
    never = threading.Event()
    scheduler = Scheduler(model, tok, max_batch=2)
    stuck = Collector()
    scheduler.submit(render_prompt(tok, [{"role": "user", "content": "What is 1 + 1?"}]), _greedy(40), stuck,
                     run_tool=lambda call: never.wait(600) and "")
    deadline = time.monotonic() + 10
    while scheduler.parked == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    scheduler.shutdown(timeout=5)
    assert time.monotonic() - started < 5 and not scheduler.alive
    assert stuck.wait(1).finish == "cancelled"
    # every llmlab thread but a training step's part pool (a ThreadPoolExecutor: idle, and stopped by Python at exit)
    ours = [t for t in threading.enumerate() if t.name.startswith("llmlab-") and not t.name.startswith("llmlab-part")]
    assert ours and all(t.daemon for t in ours)
    never.set()


def test_requests_of_different_adapters_share_a_batch_and_each_decodes_as_its_model_alone(tmp_path):
    """Two LoRA adapters in the scheduler's bank: requests through adapter 1, 2 and the base, in one batch,
    give the greedy tokens of each adapter's model alone (the adapter loaded into a copy of the base)."""
    from llmlab.lora import AdapterBank, add_lora, load_adapter, lora_modules, save_adapter

    for i, targets in ((1, ("q_proj", "v_proj")), (2, ("up_proj", "down_proj", "o_proj"))):
        adapted = _model()
        add_lora(adapted, r=2 * i, targets=targets, seed=i)
        for m in lora_modules(adapted).values():
            m.lora_B.weight.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(i))
        save_adapter(adapted, tmp_path / f"a{i}")
    alone = [_model(), load_adapter(_model(), tmp_path / "a1"), load_adapter(_model(), tmp_path / "a2")]
    model = _model()
    bank = AdapterBank(model)
    bank.add(tmp_path / "a1"), bank.add(tmp_path / "a2")
    scheduler = Scheduler(model, tokenizer=None, max_batch=4, adapters=bank)
    try:
        with pytest.raises(LLMLabError, match="no adapter 3"):
            scheduler.submit([1, 2], _greedy(), Collector(), adapter=3)
        prompt, jobs = [5, 6, 7], []
        for adapter in (1, 0, 2, 1):
            c = Collector()
            scheduler.submit(prompt, _greedy(12), c, adapter=adapter)
            jobs.append((adapter, c))
        outputs = set()
        for adapter, c in jobs:
            expected, _ = generate_naive(alone[adapter], prompt, _greedy(12))
            assert c.wait().tokens == expected
            outputs.add(tuple(c.tokens))
        assert len(outputs) == 3  # the three models say different things: the rows really went their own ways
        assert scheduler.batch_sizes_total > scheduler.steps
    finally:
        scheduler.shutdown()
