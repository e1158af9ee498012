"""Exports and imports: Hugging Face folders (same logits and greedy tokens in transformers, same chat-template ids,
Llama/Qwen3 folders imported exactly, no generation warning), GGUF read back equal, the numpy run.py
token-identical with the engine (its tool calls and calculator included), tokenizer folders, file modes, and the
errors and guards around them."""

import io
import json
import logging
import os
import random
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab import checkpoint, cli
from llmlab.chat import final_answer, render_conversation, render_prompt, reply_stop_ids
from llmlab.engine import Engine, SamplingParams, ToolCalls, generate_with_tools
from llmlab.errors import LLMLabError
from llmlab.export import export_gguf, export_hf, export_run, export_tokenizer, hf_model, run_numpy
from llmlab.export.folder import MARKER
from llmlab.export.llamacpp import gguf_name, interleave_rope, uninterleave_rope
from llmlab.model import GPT, GPTConfig, apply_rotary
from llmlab.stages import export as export_stage
from llmlab.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer
from llmlab.tools import run_tool
from llmlab.tools.calculator import calculate

transformers = pytest.importorskip("transformers")

WORDS = ("the a of to and in is was she he they what where who born lives studied city river Velmora Karst Ada "
         "Brightwater calculator answer question number sum product").split()

# (qk_norm, tie_embeddings, n_kv_head): Qwen3 and Llama layouts, tied and untied heads, GQA, MQA and MHA
LAYOUTS = [(True, False, 2), (True, True, 4), (False, False, 1), (False, True, 2)]
LAYOUT_IDS = ["qwen3-gqa-untied", "qwen3-mha-tied", "llama-mqa-untied", "llama-gqa-tied"]

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12*3?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                                                          "function": {"name": "calculator", "arguments": "12*3"}}]},
    {"role": "tool", "content": "36"},
    {"role": "assistant", "content": "It is 36."},
    {"role": "user", "content": "Where was Ada born?"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + f" {rng.randint(0, 9999)}."
             for _ in range(300)]
    return train_tokenizer(lines, vocab_size=400)


def _model(tok: Tokenizer, qk_norm: bool, tie: bool, n_kv_head: int, seed: int = 0) -> GPT:
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, n_kv_head=n_kv_head,
                    context_len=128, rope_theta=5000.0, qk_norm=qk_norm, tie_embeddings=tie)
    torch.manual_seed(seed)
    model = GPT(cfg)
    for p in model.parameters():  # the default init zeroes some matrices; parity needs every path active
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def _ids(vocab: int, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randint(len(SPECIAL_TOKENS), vocab, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ Hugging Face


@pytest.mark.parametrize("qk_norm,tie,n_kv_head", LAYOUTS, ids=LAYOUT_IDS)
def test_hf_export_matches_transformers_and_imports_back(tok, tmp_path, qk_norm, tie, n_kv_head):
    model = _model(tok, qk_norm, tie, n_kv_head)
    export_hf(model, tok, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    assert hf.dtype == torch.float32 and hf.config.tie_word_embeddings == tie

    ids = _ids(tok.vocab_size, (3, 40))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)

    # greedy decoding, stopping at generation_config's eos (<|assistant_end|>) as the engine does
    prompt = _ids(tok.vocab_size, (1, 8), seed=2)
    end = tok.special_id("<|assistant_end|>")
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64, do_sample=False)
    hf_new = out[0, 8:].tolist()
    if hf_new and hf_new[-1] == end:
        hf_new = hf_new[:-1]
    engine_new = Engine(model).generate(prompt.tolist(), SamplingParams(max_new_tokens=64, temperature=0.0), [end])[0]
    assert hf_new == engine_new and len(engine_new) >= 16

    # and the folder is a llmlab checkpoint again: same config, bit-identical logits
    back = checkpoint.load_model(tmp_path / "hf")
    assert back.config == model.config
    with torch.no_grad():
        assert torch.equal(back(ids), ours)


def test_hf_export_tokenizer_and_generation_config(tok, tmp_path):
    export_hf(_model(tok, True, False, 2), tok, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    full = CONVERSATION[:-1]
    got = hf_tok.apply_chat_template(full, tokenize=True)
    assert list(got["input_ids"] if not isinstance(got, list) else got) == render_conversation(tok, full)[0]
    got = hf_tok.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    assert list(got["input_ids"] if not isinstance(got, list) else got) == render_prompt(tok, CONVERSATION)
    gen = transformers.GenerationConfig.from_pretrained(str(tmp_path))
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (
        tok.bos_id, tok.special_id("<|assistant_end|>"), tok.pad_id)
    assert json.loads((tmp_path / MARKER).read_text())["format"] == "hf"


def _generation_messages(folder, **kwargs) -> list[str]:
    """What transformers warns or logs while `generate(**kwargs)` runs on the exported folder."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logger = logging.getLogger("transformers")  # transformers' loggers do not propagate to the root (caplog)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            hf.generate(torch.tensor([[1, 20, 30]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                        do_sample=False, **kwargs)
    finally:
        logger.removeHandler(handler)
    return [str(w.message) for w in caught] + log.getvalue().splitlines()


def test_hf_generate_with_a_length_gives_no_warning(tok, tmp_path):
    """generation_config.json sets no length, so that neither max_new_tokens nor max_length given to generate
    clashes with it (transformers warns "Both `max_new_tokens` ... and `max_length` ... seem to have been set")."""
    export_hf(_model(tok, True, False, 2), tok, tmp_path)
    assert _generation_messages(tmp_path, max_new_tokens=5) == []
    assert _generation_messages(tmp_path, max_length=8) == []
    # the check sees the warning when the config has a length, as exports before this one did
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**gen, "max_length": 128}))
    assert any("max_length" in m for m in _generation_messages(tmp_path, max_new_tokens=5))


def test_hf_model_in_memory_matches(tok):
    model = _model(tok, False, True, 2)
    ids = _ids(tok.vocab_size, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(model)(ids).logits, model(ids), atol=1e-5, rtol=0)


def _random_hf(model_type: str, **overrides):
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=96, rms_norm_eps=1e-5, rope_theta=20000.0)
    if model_type == "qwen3":
        config = transformers.Qwen3Config(**{**common, "head_dim": 32, "tie_word_embeddings": True, **overrides})
        model = transformers.Qwen3ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**{**common, **overrides})
        model = transformers.LlamaForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("model_type", ["qwen3", "llama"])
def test_import_transformers_model_gives_identical_logits(tmp_path, model_type):
    hf = _random_hf(model_type)
    hf.save_pretrained(str(tmp_path / "one"))
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = _ids(320, (2, 48))
    with torch.no_grad():
        expected = hf(ids).logits
    for folder in ("one", "sharded"):
        model = checkpoint.load_model(tmp_path / folder)
        cfg = model.config
        assert (cfg.qk_norm, cfg.n_kv_head, cfg.hdim, cfg.ffn, cfg.context_len, cfg.rope_theta) == (
            model_type == "qwen3", 2, 32 if model_type == "qwen3" else 16, 96, 96, 20000.0)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), expected, atol=1e-5, rtol=0)
    assert checkpoint.read_info(tmp_path / "one")["stage"] == "import"


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_scaling"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"use_sliding_window": True}, "sliding-window attention"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"tie_word_embeddings": True}, "lm_head.weight differs from the embedding"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
])
def test_import_refuses_what_llmlab_cannot_express(tmp_path, change, message):
    _random_hf("llama").save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    if change.get("num_hidden_layers", 0) is None:
        del config["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LLMLabError, match=message.replace("(", r"\(").replace("[", r"\[")):
        checkpoint.load_model(tmp_path)


def test_corrupt_weights_are_a_clear_error(tok, tmp_path):
    _random_hf("qwen3").save_pretrained(str(tmp_path / "hf"))
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(LLMLabError, match="model.safetensors is unreadable or corrupt"):
        checkpoint.load_model(tmp_path / "hf")
    # a llmlab checkpoint cut short, exported through the stage: the same one-line error, no output folder
    ckpt = checkpoint.save_checkpoint(tmp_path / "run", 1, _model(tok, True, True, 2), tokenizer_path=None, meta={})
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LLMLabError, match="unreadable or corrupt"):
        export_stage.main(export_stage.Config(checkpoint=str(tmp_path / "run"), format="hf",
                                              out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_tokenizer_without_llmlab_special_tokens_is_named(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    plain = HFTokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(LLMLabError, match=r"lacks llmlab's special tokens \['<\|bos\|>'"):
        Tokenizer.load(tmp_path)


# -------------------------------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("qk_norm,tie,n_kv_head", [LAYOUTS[0], LAYOUTS[3]], ids=["qwen3", "llama"])
def test_gguf_reads_back_equal(tok, tmp_path, qk_norm, tie, n_kv_head):
    gguf = pytest.importorskip("gguf")
    model = _model(tok, qk_norm, tie, n_kv_head)
    path = export_gguf(model, tok, tmp_path)
    reader = gguf.GGUFReader(str(path))
    arch = "qwen3" if qk_norm else "llama"

    def field(key):
        return reader.get_field(key).contents()

    cfg = model.config
    assert field("general.architecture") == arch
    assert [field(f"{arch}.{key}") for key in ("block_count", "embedding_length", "context_length")] == [2, 64, 128]
    assert (field(f"{arch}.attention.head_count"), field(f"{arch}.attention.head_count_kv")) == (4, n_kv_head)
    assert field(f"{arch}.feed_forward_length") == cfg.ffn and field(f"{arch}.rope.freq_base") == 5000.0
    assert field(f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    tokens = field("tokenizer.ggml.tokens")
    assert tokens == [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
    types = field("tokenizer.ggml.token_type")
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == list(range(len(SPECIAL_TOKENS)))
    merges = json.loads(tok.hf.to_str())["model"]["merges"]
    assert len(field("tokenizer.ggml.merges")) == len(merges) > 0
    assert (field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")) == ("gpt2", "qwen2")
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"),
            field("tokenizer.ggml.padding_token_id")) == (tok.bos_id, tok.special_id("<|assistant_end|>"), tok.pad_id)
    assert "<|assistant_start|>" in field("tokenizer.chat_template")

    # every tensor, under the name gguf's own table gives the Hugging Face name, equal after undoing the
    # q/k interleaving of the llama arch; a tied head is not stored
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.n_layer)
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    expected = {k: v for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert len(stored) == len(expected)
    for name, t in expected.items():
        hf_name = name if name.startswith("lm_head") else "model." + name
        assert gguf_name(name) == names.get_name(hf_name, try_suffixes=(".weight",))
        data = stored[gguf_name(name)]
        if not qk_norm and ("q_proj" in name or "k_proj" in name):
            data = uninterleave_rope(data, cfg.n_head if "q_proj" in name else cfg.n_kv_head)
        assert data.dtype == np.float32 and np.array_equal(data, t.numpy()), name


def test_interleaved_rope_layout_gives_the_same_attention_scores():
    """Rotating adjacent pairs (llama.cpp's llama arch) after `interleave_rope` equals rotate-half on the
    original rows: the reason the llama arch needs the permutation."""
    H, D, T, d_in = 2, 8, 5, 6
    gen = torch.Generator().manual_seed(0)
    wq, wk = torch.randn(H * D, d_in, generator=gen), torch.randn(H * D, d_in, generator=gen)
    x = torch.randn(T, d_in, generator=gen)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    angles = torch.outer(torch.arange(T).float(), inv_freq)  # (T, D/2)

    def rotate_half(w):  # llmlab / Hugging Face
        y = (x @ w.T).view(T, H, D).transpose(0, 1)
        emb = torch.cat((angles, angles), -1)
        return apply_rotary(y, emb.cos(), emb.sin())

    def rotate_pairs(w):  # GPT-J / llama.cpp "norm" layout on interleaved rows
        y = (x @ torch.from_numpy(interleave_rope(w.numpy(), H)).T).view(T, H, D // 2, 2).transpose(0, 1)
        a, b = y[..., 0], y[..., 1]
        cos, sin = angles.cos(), angles.sin()
        return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)

    scores = rotate_half(wq) @ rotate_half(wk).transpose(-1, -2)
    torch.testing.assert_close(rotate_pairs(wq) @ rotate_pairs(wk).transpose(-1, -2), scores, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(uninterleave_rope(interleave_rope(wq.numpy(), H), H), wq.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("qk_norm,tie,n_kv_head", [LAYOUTS[0], LAYOUTS[3]], ids=["qwen3", "llama"])
def test_llama_cpp_greedy_tokens_match_the_engine(tok, tmp_path, qk_norm, tie, n_kv_head):
    """llama.cpp itself on the export (needs `pip install llama-cpp-python`): same tokenization of text, same
    greedy tokens; for the llama arch this is what shows the q/k interleaving right."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = _model(tok, qk_norm, tie, n_kv_head, seed=6)
    llm = llama_cpp.Llama(model_path=str(export_gguf(model, tok, tmp_path)), n_ctx=128, n_threads=1, verbose=False)
    text = "Ada was born in Velmora, 1234 km away.\n\nThe <|bos|> river"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)
    prompt = _ids(tok.vocab_size, (10,), seed=7).tolist()
    expected = Engine(model).generate([prompt], SamplingParams(max_new_tokens=32, temperature=0.0))[0]
    got = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == len(expected):
            break
    assert got == expected


# ------------------------------------------------------------------------------------------------------ run.py


@pytest.fixture(scope="module")
def no_torch_path(tmp_path_factory):
    """A PYTHONPATH entry whose `torch` and `llmlab` fail to import: run.py must need neither."""
    root = tmp_path_factory.mktemp("blocked")
    for name in ("torch", "llmlab"):
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(f"raise ImportError('run.py must not import {name}')\n")
    return str(root)


def _run_py(folder, no_torch_path, *args) -> str:
    env = {**os.environ, "PYTHONPATH": no_torch_path, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(folder / "run.py"), *args], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("qk_norm,tie,n_kv_head", LAYOUTS, ids=LAYOUT_IDS)
def test_run_py_is_token_identical_to_the_engine(tok, tmp_path, no_torch_path, qk_norm, tie, n_kv_head):
    model = _model(tok, qk_norm, tie, n_kv_head, seed=3)
    run_py = export_run(model, tok, tmp_path)
    prompt = _ids(tok.vocab_size, (10,), seed=4).tolist()
    expected = Engine(model).generate([prompt], SamplingParams(max_new_tokens=64, temperature=0.0))[0]
    ids = ",".join(map(str, prompt))
    got = json.loads(_run_py(run_py.parent, no_torch_path, "--ids", ids, "--max_new_tokens", "64"))
    assert len(expected) == 64 and got == expected


def test_run_py_chat_reply_matches_the_engine(tok, tmp_path, no_torch_path):
    """--chat prints what `llmlab chat` keeps of a reply: its words after the last tool output."""
    model = _model(tok, True, False, 2, seed=5)
    export_run(model, tok, tmp_path)
    messages = [{"role": "user", "content": "Where was Ada born?"}]
    out, _ = generate_with_tools(Engine(model), tok, [render_prompt(tok, messages)],
                                 SamplingParams(max_new_tokens=40, temperature=0.0), reply_stop_ids(tok),
                                 run_numpy.run_tool)
    answer = final_answer(tok, out[0]).strip()
    got = _run_py(tmp_path, no_torch_path, "--chat", "Where was Ada born?", "--max_new_tokens", "40")
    assert got == answer + "\n" and answer


def test_run_py_tool_loop_forces_what_the_engine_forces(tok):
    """run.py's decode loop on a scripted model that calls the calculator and the python tool: the same tokens
    as the engine's ToolCalls appends for the same predictions, every forced token fed back to the model, and
    the same final answer as llmlab.chat.final_answer."""
    sp = tok.special_id
    python_error = "error: the python tool is not available in run.py (use llmlab chat)"
    filler = tok.encode("x")  # what the model predicts while a tool's output is forced: ignored

    def call(text: str, result: str) -> list[int]:
        return [sp("<|tool_start|>"), *tok.encode(text), sp("<|tool_end|>")] + filler * (len(tok.encode(result)) + 2)

    predictions = (tok.encode("Let me see.") + call("calculator 48213 * 907", "43729191") + tok.encode(" Also")
                   + call("python print(6*7)", python_error) + tok.encode("The answer is 43729191.")
                   + [sp("<|assistant_end|>")] + filler * 3)
    prompt = render_prompt(tok, [{"role": "user", "content": "What is 48213 * 907?"}])
    fed: list[int] = []

    def next_token(ids: list[int]) -> int:  # the scripted model: its i-th prediction, whatever it was fed
        fed.extend(ids)
        return predictions[len(fed) - len(prompt)]

    loop = run_numpy.ToolLoop(tok.hf)
    got = list(run_numpy.generate(next_token, prompt, 200, set(reply_stop_ids(tok)), loop))

    def engine_tool(text: str) -> str:  # llmlab's own calculator; run.py's answer for the python tool
        return run_tool(text).text if text.startswith("calculator") else run_numpy.run_tool(text)

    calls, expected = ToolCalls(tok, 1, engine_tool), []
    for predicted in predictions:
        token = int(calls(torch.tensor([predicted]))[0])
        if token in reply_stop_ids(tok):
            break
        expected.append(token)
    assert got == expected and fed == prompt + got
    assert loop.calls == [("calculator 48213 * 907", "43729191"), ("python print(6*7)", python_error)]
    assert calls.calls[0] == loop.calls
    forced = [sp("<|output_start|>"), *tok.encode("43729191"), sp("<|output_end|>")]
    assert any(got[i:i + len(forced)] == forced for i in range(len(got)))
    assert run_numpy.final_text(tok.hf, got) == final_answer(tok, got) == "The answer is 43729191."
    # max_new_tokens counts forced tokens too, as in the engine; no model call after the last token
    fed.clear()
    assert list(run_numpy.generate(next_token, prompt, 3)) == predictions[:3] and len(fed) == len(prompt) + 2


CALCULATOR_CASES = [
    "48213 * 907", "1/3", "10**20/3", "-2**2", "2**3**2", "0.1+0.2", "1/8", ".5*3", "7 // -2", "-7 % 3", "--2", "+-+2",
    "1/7*10**12", "1/(10**7*3)", "999999999999.5/7", "0.0000001/3", "1/3*10**11", "1/3*10**12", "-1/3", "2/3",
    "99999999999.99/1", "1.5**3", "0.5**2000", "7/0.1", "0**0", "1/2**5000", "1/2**13000", "(1/3)*10**3999",
    "5**5000/2**5000", "3**8000", "10**3999", "9" * 4000, " 12 ", "\u0663+1", "1/3/10**6", "1/3/10**5", "10**13/3",
    # errors
    "2**-1", "2**0.5", "9**9**9", "10**4000", "10**3999*10", "1/2**13300", "1/0", "5//0", "5%0", "3.", "1,234", "",
    "  ", "1e3", "x", "((2)", "2)", "2***2", "4//", "//4", "()", "(1)(2)", "9" * 4001, "1+" * 5001 + "1",
    "(" * 99 + "1" + ")" * 99, "(" * 100 + "1" + ")" * 100, "-" * 99 + "1", "-" * 100 + "1",
]


def _same_answer(expr: str) -> None:
    ours, theirs = run_numpy.calculate(expr), calculate(expr)
    assert ours == theirs or (ours.startswith("error: ") and theirs.startswith("error: ")), (expr, ours, theirs)
    if not theirs.startswith("error: "):  # and through the tool call, its 2,000-character cut included
        assert run_numpy.run_tool(f"calculator {expr}") == run_tool(f"calculator {expr}").text


@pytest.mark.parametrize("expr", CALCULATOR_CASES, ids=range(len(CALCULATOR_CASES)))
def test_run_py_calculator_agrees_with_llmlab(expr):
    _same_answer(expr)


_NUMBERS = st.one_of(st.integers(0, 10**6).map(str), st.integers(0, 10**40).map(str),
                     st.from_regex(r"\d{1,4}\.\d{1,4}|\.\d{1,3}", fullmatch=True))


def _compound(inner):
    return st.one_of(st.builds("{} {} {}".format, inner, st.sampled_from(["+", "-", "*", "/", "//", "%"]), inner),
                     st.builds("{}**{}".format, inner, st.integers(0, 12) | inner),
                     inner.map("({})".format), inner.map("-{}".format), inner.map("+{}".format))


@settings(max_examples=300, deadline=None)
@given(st.recursive(_NUMBERS, _compound, max_leaves=10))
def test_run_py_calculator_agrees_on_expressions(expr):
    _same_answer(expr)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789.+-*/%() ", max_size=24))
def test_run_py_calculator_agrees_on_any_text(expr):
    _same_answer(expr)


# ------------------------------------------------------------------------------------------ tokenizer, stage, CLI


def test_tokenizer_export_loads_in_transformers_and_llmlab(tok, tmp_path):
    tok.save(tmp_path / "trained")
    result = export_stage.main(export_stage.Config(checkpoint=str(tmp_path / "trained"), format="tokenizer",
                                                   out_dir=str(tmp_path / "tok")))
    assert set(result["files"]) == {"tokenizer.json", "tokenizer_config.json", MARKER}
    text = "Ada was born in Velmora, 1234 <|bos|> km away."
    assert Tokenizer.load(tmp_path / "tok").encode(text) == tok.encode(text)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert hf_tok.eos_token == "<|assistant_end|>"
    got = hf_tok.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)
    assert list(got["input_ids"] if not isinstance(got, list) else got) == render_prompt(tok, CONVERSATION)


def test_stage_exports_a_checkpoint_next_to_it(tok, tmp_path):
    tok.save(tmp_path / "tokenizer")
    model = _model(tok, False, False, 2)
    checkpoint.save_checkpoint(tmp_path / "run" / "sft", 5, model, tokenizer_path=tmp_path / "tokenizer", meta={})
    result = export_stage.main(export_stage.Config(checkpoint=str(tmp_path / "run" / "sft"), format="gguf"))
    assert result["out_dir"] == str(tmp_path / "run" / "export-gguf") and "model.gguf" in result["files"]
    # the CLI starts the stage from its own defaults (no preset has an export section)
    cfg = cli.stage_config("export", ["--format", "run", "--force", "true"])
    assert (cfg.checkpoint, cfg.format, cfg.force) == ("runs/cpu/sft", "run", True)
    with pytest.raises(LLMLabError, match="unknown format 'onnx'"):
        export_stage.Config(format="onnx")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_follow_the_umask(tok, tmp_path, umask):
    """Every file of every format is created as open() creates it (0666 less the umask): the weights too,
    which safetensors' save_file would leave 0600."""
    pytest.importorskip("gguf")
    model = _model(tok, True, True, 2)
    old = os.umask(umask)
    try:
        export_hf(model, tok, tmp_path / "hf")
        export_run(model, tok, tmp_path / "run")
        export_gguf(model, tok, tmp_path / "gguf")
        export_tokenizer(tok, tmp_path / "tokenizer")
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert "run/model.safetensors" in modes and "hf/model.safetensors" in modes and "gguf/model.gguf" in modes
    assert modes == {name: (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask for name in modes}


def test_output_folder_is_never_clobbered(tok, tmp_path, monkeypatch):
    model = _model(tok, True, True, 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LLMLabError, match="not empty and is not an earlier llmlab export.*--force"):
        export_hf(model, tok, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"

    export_hf(model, tok, out, force=True)  # replaced as a whole
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    export_run(model, tok, out)  # an earlier export is replaced without force
    assert (out / "run.py").is_file() and not (out / "generation_config.json").exists()

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("llmlab.export.hf.write_durably", fail)  # a crash mid-export leaves the old folder whole
    with pytest.raises(RuntimeError, match="disk full"):
        export_hf(model, tok, out)
    assert (out / "run.py").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    ckpt = checkpoint.save_checkpoint(tmp_path / "ckpts", 1, model, tokenizer_path=None, meta={})
    with pytest.raises(LLMLabError, match="contains the checkpoint being exported"):
        export_run(model, None, tmp_path / "ckpts", force=True, source=ckpt)
    assert (ckpt / "model.safetensors").is_file()
