"""The calculator tool: exact arithmetic on numbers of any size, parsed by hand, never `eval`ed.

Grammar (loosest binding first; `**` binds tighter than a unary minus and groups to the right, as in Python,
so `-2**2` is -4 and `2**3**2` is 512):

    expression := term (("+" | "-") term)*
    term       := unary (("*" | "/" | "//" | "%") unary)*
    unary      := ("+" | "-") unary | power
    power      := atom ("**" unary)?
    atom       := NUMBER | "(" expression ")"
    NUMBER     := digits, optionally with a decimal point: 42, 3.14, .5

Every value is an exact `fractions.Fraction`: `/` is exact division, `//` and `%` floor like Python's.
Digit separators (`1,234`, `1_234`), exponent notation (`1e3`), names and functions are rejected with an
error that says so; keeping the language this small keeps the parser obviously safe.

Results:
- an integer is printed exactly: `123456*789` -> `97406784`;
- a non-integer whose decimal expansion ends (its reduced denominator has no prime factors but 2 and 5) is
  printed exactly: `1/8` -> `0.125`, `0.1+0.2` -> `0.3`;
- any other value is rounded to 12 significant digits and marked `≈`: `1/3` -> `≈0.333333333333`,
  `10**20/3` -> `≈3.33333333333e+19` (plain notation for magnitudes from 1e-6 up to 1e12, otherwise
  scientific); so is an ending decimal with more than MAX_DIGITS digits.

Limits that keep a call cheap (no "CPU bomb" such as `9**9**9`): every intermediate numerator and
denominator stays below 10**MAX_DIGITS, a power is refused when its size estimate is already over that
before computing it, the exponent must be a non-negative integer, and the expression is at most MAX_CHARS
characters nested at most MAX_DEPTH deep. Errors come back as a string starting with "error: ".
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

MAX_DIGITS = 4000  # below Python's 4300-digit int<->str conversion limit (sys.int_info.default_max_str_digits)
MAX_CHARS = 10_000
MAX_DEPTH = 100  # nested parentheses, signs and powers; each level costs a few Python frames
SIGNIFICANT_DIGITS = 12

_LIMIT = 10**MAX_DIGITS
_MAX_BITS = math.ceil(MAX_DIGITS * math.log2(10))
_TOKEN = re.compile(r"\d+(?:\.\d+)?|\.\d+|\*\*|//|[-+*/%()]")
_HINTS = {",": "write numbers without separators (1234, not 1,234)",
          "_": "write numbers without separators (1234, not 1_234)",
          "^": "use ** for powers", "x": "use * for multiplication", "×": "use * for multiplication",
          "÷": "use / for division", "=": "write only the expression, without '='",
          ".": "a decimal point needs digits after it (3.0, not 3.)"}


class CalculatorError(Exception):
    """A message for the model: what is wrong with its expression."""


def calculate(expr: str) -> str:
    """The exact value of `expr` as text, or "error: ..." (see the module docstring for the rules)."""
    try:
        return _format(_Parser(expr).parse())
    except CalculatorError as e:
        return f"error: {e}"


def _tokenize(expr: str) -> list[tuple[str, int]]:
    """(token, 1-based position) pairs ending with ("", end): numbers and operators, whitespace dropped."""
    if len(expr) > MAX_CHARS:
        raise CalculatorError(f"expression too long ({len(expr)} characters; at most {MAX_CHARS})")
    tokens, i = [], 0
    while True:
        while i < len(expr) and expr[i].isspace():
            i += 1
        if i == len(expr):
            tokens.append(("", i + 1))
            return tokens
        m = _TOKEN.match(expr, i)
        if m is None:
            char = expr[i]
            hint = _HINTS.get(char, "only numbers, + - * / // % ** and parentheses are allowed")
            raise CalculatorError(f"unexpected character {char!r} at position {i + 1}: {hint}")
        tokens.append((m.group(), i + 1))
        i = m.end()


def _number(text: str, position: int) -> Fraction:
    whole, _, fraction = text.partition(".")
    if len(whole) + len(fraction) > MAX_DIGITS:
        raise CalculatorError(f"the number at position {position} has more than {MAX_DIGITS} digits")
    return Fraction(int(whole + fraction or "0"), 10 ** len(fraction))


def _check_size(value: Fraction) -> Fraction:
    if abs(value.numerator) >= _LIMIT or value.denominator >= _LIMIT:
        raise CalculatorError(f"result too large (more than {MAX_DIGITS} digits)")
    return value


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1 or exponent < 0:
        raise CalculatorError(f"the exponent must be a non-negative integer, got {_format(exponent)}")
    e = exponent.numerator
    bits = max(abs(base.numerator).bit_length(), base.denominator.bit_length())
    if bits > 1 and (bits - 1) * e > _MAX_BITS:  # |result| >= 2**((bits-1)*e): too large before computing it
        raise CalculatorError(f"result too large (more than {MAX_DIGITS} digits)")
    return _check_size(base**e)


class _Parser:
    """Recursive descent over the token list, one method per grammar rule, evaluating as it goes."""

    def __init__(self, expr: str):
        self.tokens = _tokenize(expr)
        self.i = 0
        self.depth = 0

    def parse(self) -> Fraction:
        if self.tokens[0][0] == "":
            raise CalculatorError("empty expression: write one, e.g. 2*(3+4)")
        value = self.expression()
        token, position = self.tokens[self.i]
        if token:
            raise CalculatorError(f"unexpected {token!r} at position {position}: expected an operator or the end")
        return value

    def take(self) -> tuple[str, int]:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def peek(self) -> str:
        return self.tokens[self.i][0]

    def expression(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op, _ = self.take()
            right = self.term()
            value = _check_size(value + right if op == "+" else value - right)
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/", "//", "%"):
            op, _ = self.take()
            right = self.unary()
            if op == "*":
                value = _check_size(value * right)
                continue
            if right == 0:
                raise CalculatorError("division by zero")
            if op == "/":
                value = _check_size(value / right)
            elif op == "//":
                value = _check_size(Fraction(value // right))
            else:
                value = _check_size(value % right)
        return value

    def unary(self) -> Fraction:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalculatorError(f"expression nested too deeply (more than {MAX_DEPTH} levels)")
        if self.peek() in ("+", "-"):
            op, _ = self.take()
            value = self.unary()
            value = -value if op == "-" else value
        else:
            value = self.power()
        self.depth -= 1
        return value

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() == "**":
            self.take()
            return _power(base, self.unary())
        return base

    def atom(self) -> Fraction:
        token, position = self.take()
        if token[:1].isdigit() or token[:1] == ".":
            return _number(token, position)
        if token == "(":
            value = self.expression()
            if self.peek() != ")":
                found, at = self.tokens[self.i]
                found = repr(found) if found else "the end of the expression"
                raise CalculatorError(f"missing ')' for the '(' at position {position} "
                                      f"(found {found} at position {at})")
            self.take()
            return value
        found = repr(token) if token else "the end of the expression"
        raise CalculatorError(f"expected a number or '(' at position {position}, found {found}")


def _format(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    sign, value = ("-" if value < 0 else ""), abs(value)
    rest, twos, fives = value.denominator, 0, 0
    while rest % 2 == 0:
        rest, twos = rest // 2, twos + 1
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    scale = max(twos, fives)
    if rest == 1 and value.numerator * 10**scale < _LIMIT * value.denominator:  # ends, within MAX_DIGITS digits
        digits = str(value.numerator * 10**scale // value.denominator).rjust(scale + 1, "0")
        return f"{sign}{digits[:-scale]}.{digits[-scale:]}"
    return f"≈{sign}{_significant(value)}"


def _significant(value: Fraction) -> str:
    """A positive value rounded to SIGNIFICANT_DIGITS digits, plain from 1e-6 to 1e12, scientific otherwise."""
    n = SIGNIFICANT_DIGITS
    e = len(str(value.numerator)) - len(str(value.denominator))  # 10**e <= value < 10**(e+1), up to one off
    if value >= Fraction(10) ** (e + 1):
        e += 1
    elif value < Fraction(10) ** e:
        e -= 1
    mantissa = round(value / Fraction(10) ** (e - n + 1))  # n digits
    if mantissa == 10**n:  # rounded up to the next power of ten
        mantissa, e = 10 ** (n - 1), e + 1
    digits = str(mantissa)
    if -6 <= e < n:
        text = digits[: e + 1] + "." + digits[e + 1:] if e >= 0 else "0." + "0" * (-e - 1) + digits
        return text.rstrip("0").rstrip(".")
    return f"{(digits[0] + '.' + digits[1:]).rstrip('0').rstrip('.')}e{e:+d}"
