"""run.py: greedy generation with an exported llmlab model in plain numpy (no torch, no llmlab).

Needs numpy and safetensors; text in and out also needs `tokenizers` (token ids do not):
`pip install numpy safetensors tokenizers`. Reads config.json, model.safetensors and tokenizer.json from the
folder it sits in (or --model_dir). Gives the same tokens as llmlab's engine at temperature 0.

With --chat, the assistant's calculator calls run here as they do in `llmlab chat`: when the model writes
`<|tool_start|>calculator EXPR<|tool_end|>`, EXPR is evaluated exactly (a small parser below, never `eval`),
`<|output_start|>RESULT<|output_end|>` is forced into the sequence and generation goes on. The reply printed is
the assistant's text after its last tool output; each call and its result go to stderr. The python and search
tools need llmlab (a sandbox, the world's index): a call to them gets an error as its output, saying so.

    python run.py "Q: Where was Ada born? A:"      complete text (after <|bos|>), stop at <|bos|>
    python run.py --chat "What is 48213 * 907?"    the assistant's reply to one user message, calculator included
    python run.py --ids 0,17,42                    continue token ids; prints the new ids as JSON, no stop, no tools
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import re
import sys
from decimal import ROUND_HALF_EVEN, Context, Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


class Model:
    """The decoder: embedding -> layers of [RMSNorm, attention with RoPE (and QK norm in Qwen3 layout),
    RMSNorm, SwiGLU] -> RMSNorm -> head. Keys and values of past positions are kept per layer (a KV cache)."""

    def __init__(self, folder: Path):
        cfg = json.loads((folder / "config.json").read_text())
        self.w = load_file(str(folder / "model.safetensors"))
        self.n_layer, self.n_head, self.n_kv_head = cfg["n_layer"], cfg["n_head"], cfg["n_kv_head"]
        self.head_dim = cfg["head_dim"] or cfg["d_model"] // cfg["n_head"]
        self.eps, self.qk_norm, self.context_len = cfg["norm_eps"], cfg["qk_norm"], cfg["context_len"]
        self.head = self.w.get("lm_head.weight", self.w["embed_tokens.weight"])  # tied: one matrix for both
        # RoPE tables, "rotate half" layout: dimension j pairs with j + head_dim/2, both at frequency j
        inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, self.head_dim, 2, dtype=np.float32) / self.head_dim)
        angles = np.outer(np.arange(self.context_len, dtype=np.float32), inv_freq.astype(np.float32))
        angles = np.concatenate([angles, angles], axis=-1)  # (context_len, head_dim)
        self.cos, self.sin = np.cos(angles), np.sin(angles)
        self.cache = [None] * self.n_layer  # per layer: (keys, values), each (n_kv_head, length, head_dim)

    def norm(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def rope(self, x, pos):  # x (heads, T, head_dim)
        half = self.head_dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * self.cos[pos] + rotated * self.sin[pos]

    def forward(self, ids: list[int]) -> np.ndarray:
        """Append ids to the sequence; return the logits (vocab,) of the next token."""
        start = 0 if self.cache[0] is None else self.cache[0][0].shape[1]
        T, D, H, Hkv = len(ids), self.head_dim, self.n_head, self.n_kv_head
        pos = np.arange(start, start + T)
        x = self.w["embed_tokens.weight"][ids]  # (T, d_model)
        for i in range(self.n_layer):
            p = f"layers.{i}."
            h = self.norm(x, self.w[p + "input_layernorm.weight"])
            q = (h @ self.w[p + "self_attn.q_proj.weight"].T).reshape(T, H, D)
            k = (h @ self.w[p + "self_attn.k_proj.weight"].T).reshape(T, Hkv, D)
            v = (h @ self.w[p + "self_attn.v_proj.weight"].T).reshape(T, Hkv, D)
            if self.qk_norm:
                q = self.norm(q, self.w[p + "self_attn.q_norm.weight"])
                k = self.norm(k, self.w[p + "self_attn.k_norm.weight"])
            q, k, v = q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # (heads, T, D)
            q, k = self.rope(q, pos), self.rope(k, pos)
            if self.cache[i] is not None:
                k, v = np.concatenate([self.cache[i][0], k], axis=1), np.concatenate([self.cache[i][1], v], axis=1)
            self.cache[i] = (k, v)
            k, v = np.repeat(k, H // Hkv, axis=0), np.repeat(v, H // Hkv, axis=0)  # grouped-query heads
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(np.float32(D))  # (H, T, start + T)
            causal = np.arange(start + T)[None, :] <= pos[:, None]
            scores = np.where(causal, scores, -np.inf)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            y = (probs @ v).transpose(1, 0, 2).reshape(T, H * D)
            x = x + y @ self.w[p + "self_attn.o_proj.weight"].T
            h = self.norm(x, self.w[p + "post_attention_layernorm.weight"])
            gate, up = h @ self.w[p + "mlp.gate_proj.weight"].T, h @ self.w[p + "mlp.up_proj.weight"].T
            silu = gate * (0.5 + 0.5 * np.tanh(gate / 2))  # gate * sigmoid(gate), without overflow in exp
            x = x + (silu * up) @ self.w[p + "mlp.down_proj.weight"].T  # SwiGLU
        return self.norm(x[-1], self.w["norm.weight"]) @ self.head.T

    def next_token(self, ids: list[int]) -> int:
        """Append ids to the sequence; return the greedy next token."""
        return int(np.argmax(self.forward(ids)))


# ----------------------------------------------------------------------------------------------- calculator
# The calculator of llmlab.tools.calculator (its docstring has the rules), written again here so that run.py
# stands alone; tests/test_export.py checks that both give the same results. Values are exact Fractions;
# `**` binds tighter than a unary minus and groups to the right, as in Python (-2**2 is -4, 2**3**2 is 512).

CALC_MAX_DIGITS, CALC_MAX_CHARS, CALC_MAX_DEPTH = 4000, 10_000, 100
TOOL_OUTPUT_CHARS, TRUNCATED = 2000, "... [truncated]"  # llmlab.tools.result: no output floods the context
_CALC_TOKEN = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+|\*\*|//|[-+*/%()])")
_BINARY = {"+": (1, operator.add), "-": (1, operator.sub), "*": (2, operator.mul),
           "/": (2, operator.truediv), "//": (2, operator.floordiv), "%": (2, operator.mod)}  # (binding, op)
_ROUNDED = Context(prec=12, rounding=ROUND_HALF_EVEN, Emax=10**6, Emin=-10**6)  # 12 significant digits


def _bounded(value: Fraction) -> Fraction:
    if max(abs(value.numerator), value.denominator) >= 10**CALC_MAX_DIGITS:
        raise ValueError(f"result too large (more than {CALC_MAX_DIGITS} digits)")
    return value


class Calculation:
    """Precedence climbing over the tokens of one expression, evaluating as it reads. An operand (a signed
    number, a parenthesis, a power) may nest at most CALC_MAX_DEPTH deep; a power whose size is over the limit
    is refused before it is computed."""

    def __init__(self, expr: str):
        if len(expr) > CALC_MAX_CHARS:
            raise ValueError(f"expression too long ({len(expr)} characters; at most {CALC_MAX_CHARS})")
        self.tokens, at, end = [], 0, len(expr.rstrip())
        while at < end:
            match = _CALC_TOKEN.match(expr, at)
            if match is None:
                raise ValueError(f"unexpected character {expr[at:].lstrip()[0]!r}: only numbers, "
                                 f"+ - * / // % ** and parentheses are allowed")
            self.tokens.append(match.group(1))
            at = match.end()
        self.tokens.append("")  # the end
        self.at, self.depth = 0, 0  # the next token; operands open

    def value(self) -> Fraction:
        result = self.binary(1)
        if self.tokens[self.at]:
            raise ValueError(f"unexpected {self.tokens[self.at]!r}: expected an operator or the end")
        return result

    def take(self) -> str:
        self.at += 1
        return self.tokens[self.at - 1]

    def binary(self, binding: int) -> Fraction:
        left = self.operand()
        while _BINARY.get(self.tokens[self.at], (0,))[0] >= binding:
            strength, op = _BINARY[self.take()]
            right = self.binary(strength + 1)
            if right == 0 and op in (operator.truediv, operator.floordiv, operator.mod):
                raise ValueError("division by zero")
            left = _bounded(Fraction(op(left, right)))
        return left

    def operand(self) -> Fraction:
        self.depth += 1
        if self.depth > CALC_MAX_DEPTH:
            raise ValueError(f"expression nested too deeply (more than {CALC_MAX_DEPTH} levels)")
        token = self.take()
        if token in ("+", "-"):
            result = -self.operand() if token == "-" else self.operand()
        else:
            result = self.atom(token)
            if self.tokens[self.at] == "**":
                self.take()
                result = self.power(result, self.operand())
        self.depth -= 1
        return result

    def atom(self, token: str) -> Fraction:
        if token == "(":
            inside = self.binary(1)
            if self.take() != ")":
                raise ValueError("missing ')'")
            return inside
        if token[:1].isdigit() or token[:1] == ".":
            whole, _, decimals = token.partition(".")
            if len(whole) + len(decimals) > CALC_MAX_DIGITS:
                raise ValueError(f"a number has more than {CALC_MAX_DIGITS} digits")
            return Fraction(int(whole + decimals), 10 ** len(decimals))
        raise ValueError(f"expected a number or '(', found {token!r}" if token else "unexpected end of expression")

    @staticmethod
    def power(base: Fraction, exponent: Fraction) -> Fraction:
        if exponent.denominator != 1 or exponent < 0:
            raise ValueError("the exponent must be a non-negative integer")
        size_bits = max(abs(base.numerator).bit_length(), base.denominator.bit_length()) - 1
        if size_bits * exponent.numerator > math.ceil(CALC_MAX_DIGITS * math.log2(10)):  # |result| >= 2**that
            raise ValueError(f"result too large (more than {CALC_MAX_DIGITS} digits)")
        return _bounded(base**exponent.numerator)


def calculator_text(value: Fraction) -> str:
    """An integer or an ending decimal exactly (`0.125`); any other value to 12 significant digits, marked `≈`,
    plain from 1e-6 to 1e12 and scientific beyond (`≈3.33333333333e+19`)."""
    if value.denominator == 1:
        return str(value.numerator)
    sign, value = "-" if value < 0 else "", abs(value)
    twos = (value.denominator & -value.denominator).bit_length() - 1
    rest, fives = value.denominator >> twos, 0
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest == 1:  # the decimal expansion ends, after max(twos, fives) places
        places = max(twos, fives)
        digits = value.numerator * 10**places // value.denominator
        if digits < 10**CALC_MAX_DIGITS:
            whole, fraction = divmod(digits, 10**places)
            return f"{sign}{whole}.{fraction:0{places}d}"
    rounded = _ROUNDED.divide(Decimal(value.numerator), Decimal(value.denominator))
    exponent = rounded.adjusted()
    if -6 <= exponent < 12:
        text = format(rounded, "f")
        return f"≈{sign}{text.rstrip('0').rstrip('.') if '.' in text else text}"
    digits = "".join(map(str, rounded.as_tuple().digits)).ljust(12, "0")
    return f"≈{sign}{(digits[0] + '.' + digits[1:]).rstrip('0').rstrip('.')}e{exponent:+d}"


def calculate(expr: str) -> str:
    """The calculator's answer to `expr`: its exact value as text, or "error: ..."."""
    try:
        return calculator_text(Calculation(expr).value())
    except ValueError as e:
        return f"error: {e}"


# ------------------------------------------------------------------------------------------------ tool calls


def run_tool(call: str) -> str:
    """The output forced in after `<|tool_start|>NAME ARGS<|tool_end|>`, cut to TOOL_OUTPUT_CHARS."""
    name, *args = re.split(r"\s", call.strip(), maxsplit=1)
    if name == "calculator":
        text = calculate(args[0].strip() if args else "")
    elif name in ("python", "search"):
        text = f"error: the {name} tool is not available in run.py (use llmlab chat)"
    else:
        text = f"error: unknown tool {name!r} (tools: calculator, python, search)"
    if len(text) > TOOL_OUTPUT_CHARS:
        text = text[: TOOL_OUTPUT_CHARS - len(TRUNCATED)] + TRUNCATED
    return text


class ToolLoop:
    """The engine's tool-call state machine (llmlab.engine.ToolCalls) for one sequence: after the model writes
    `<|tool_end|>`, the call between it and `<|tool_start|>` goes to `run_tool` and the next tokens appended are
    forced, whatever the model predicts: `<|output_start|>`, the result's tokens, `<|output_end|>`."""

    def __init__(self, tok):
        self.tok = tok
        self.start, self.end, self.out_start, self.out_end = (
            tok.token_to_id(f"<|{name}|>") for name in ("tool_start", "tool_end", "output_start", "output_end"))
        self.call: list[int] | None = None  # the tokens of the call being written
        self.forced: list[int] = []  # the tokens still to force
        self.calls: list[tuple[str, str]] = []  # (call, result)

    def __call__(self, predicted: int) -> int:
        """The token appended after the model predicts `predicted`."""
        if self.forced:
            return self.forced.pop(0)
        if predicted == self.start:
            self.call = []
        elif predicted == self.end and self.call is not None:
            call = self.tok.decode(self.call, skip_special_tokens=False).strip()
            self.calls.append((call, run_tool(call)))
            result = self.tok.encode(self.calls[-1][1], add_special_tokens=False).ids
            self.call, self.forced = None, [self.out_start, *result, self.out_end]
        elif self.call is not None:
            self.call.append(predicted)
        return predicted


def generate(next_token, prompt: list[int], max_new_tokens: int, stop_ids=(), tools: ToolLoop | None = None):
    """Yield new tokens one by one as llmlab's engine does at temperature 0, until a stop id (not yielded) or
    max_new_tokens. `next_token(ids)` appends ids to the sequence and returns the model's next token; `tools`
    may replace it with a forced one."""
    if max_new_tokens <= 0:
        return
    token = next_token(list(prompt))
    for i in range(max_new_tokens):
        token = tools(token) if tools is not None else token
        if token in stop_ids:
            return
        yield token
        if i + 1 < max_new_tokens:
            token = next_token([token])


def final_text(tok, ids: list[int]) -> str:
    """The assistant's words after its last tool output, special tokens left out (llmlab.chat.final_answer)."""
    out_end = tok.token_to_id("<|output_end|>")
    last = max((i for i, t in enumerate(ids) if t == out_end), default=-1)
    return tok.decode(ids[last + 1:], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", default="", help="text to complete (or the user's message with --chat)")
    parser.add_argument("--chat", action="store_true", help="answer the prompt as the assistant, running its calculator")
    parser.add_argument("--ids", default="", help="comma-separated prompt token ids instead of text")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--model_dir", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args()
    folder = Path(args.model_dir)
    model = Model(folder)

    def room(prompt: list[int]) -> int:
        if len(prompt) > model.context_len:
            sys.exit(f"the prompt has {len(prompt)} tokens, more than the model's context of {model.context_len}")
        return min(args.max_new_tokens, model.context_len - len(prompt))

    if args.ids:
        prompt = [int(t) for t in args.ids.split(",")]
        print(json.dumps(list(generate(model.next_token, prompt, room(prompt)))))
        return
    try:  # deferred: only text needs it; token ids run with numpy and safetensors alone
        from tokenizers import Tokenizer
    except ImportError:
        sys.exit("text in and out needs the tokenizers package: pip install tokenizers (--ids runs without it)")

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.encode_special_tokens = True  # special-token text typed in a prompt stays text, as in llmlab
    sp = tok.token_to_id
    text = tok.encode(args.prompt, add_special_tokens=False).ids
    if args.chat:
        prompt = [sp("<|bos|>"), sp("<|user_start|>"), *text, sp("<|user_end|>"), sp("<|assistant_start|>")]
        tools, reply, shown = ToolLoop(tok), [], 0
        for token in generate(model.next_token, prompt, room(prompt), {sp("<|assistant_end|>"), sp("<|bos|>")}, tools):
            reply.append(token)
            for call, result in tools.calls[shown:]:  # as `llmlab chat` shows them, on stderr
                print(f"[tool: {call} -> {result}]", file=sys.stderr, flush=True)
            shown = len(tools.calls)
        print(final_text(tok, reply).strip())
        return
    prompt = [sp("<|bos|>"), *text]
    sys.stdout.write(args.prompt)
    new, printed = [], ""
    for token in generate(model.next_token, prompt, room(prompt), {sp("<|bos|>")}):
        new.append(token)
        text = tok.decode(new, skip_special_tokens=False)
        if not text.endswith("\ufffd"):  # else a character is split over tokens: wait for its last byte
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    sys.stdout.write(tok.decode(new, skip_special_tokens=False)[len(printed):] + "\n")


if __name__ == "__main__":
    main()
