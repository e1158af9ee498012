"""The security card: attack success rates with 95% confidence intervals, beside utility and over-refusal.

One row per (attack family, defense, goal): how many attempts the world's exact judge counted as hits out of how
many were made. The interval is Wilson's score interval, which stays inside [0, 1] and is honest at 0 or n hits
(a normal approximation would claim 0% +- 0 after 0 hits in 20), unlike the Wald interval.

    rows = [Row("gcg", "none", "secret", hits=46, n=50), ...]
    print(markdown(rows, utility))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

Z95 = 1.959963984540054


def wilson(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion hits / n (95% by default); (0, 1) when n is 0."""
    if not 0 <= hits <= n:
        raise ValueError(f"hits must be between 0 and n (got {hits} of {n})")
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at 0 or n hits a bound is exactly 0 or 1 (centre -+ half is, in exact arithmetic; floats miss it by an ulp)
    return (0.0 if hits == 0 else max(0.0, centre - half)), (1.0 if hits == n else min(1.0, centre + half))


@dataclass
class Row:
    family: str
    """the attack family (e.g. "roleplay", "gcg")"""
    defense: str
    """"none" or the defenses applied, joined by "+" """
    goal: str
    """what the attacker wants: "forbidden" (the assistant complies with a forbidden request) or "secret"
    (it leaks the secret code of its system prompt)"""
    hits: int
    n: int
    useful: int | None = None
    """replies still useful under attack (the inject goal: the tool's true result, not the attacker's)"""

    @property
    def asr(self) -> float:
        return self.hits / self.n if self.n else 0.0

    @property
    def ci(self) -> tuple[float, float]:
        return wilson(self.hits, self.n)

    def to_dict(self) -> dict:
        return {**asdict(self), "asr": self.asr, "ci": list(self.ci)}

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        return cls(d["family"], d["defense"], d["goal"], int(d["hits"]), int(d["n"]), d.get("useful"))


def percent(row: Row) -> str:
    lo, hi = row.ci
    return f"{100 * row.asr:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def markdown(rows: list[Row], utility: dict[str, dict[str, float]] | None = None) -> str:
    """The card as a markdown table: one line per family and defense, a column of ASR [95% CI] per goal, the
    share of replies useful under attack where rows count it, then utility and over-refusal per defense where
    `utility` ({defense: {"utility": x, "over_refusal": y}}) has them, and utility in the second language where
    it has "utility_l2"."""
    goals = sorted({r.goal for r in rows})
    under = any(r.useful is not None for r in rows)
    l2 = any("utility_l2" in u for u in (utility or {}).values())
    lines = ["| attack | defense | " + " | ".join(f"ASR {g} [95% CI]" for g in goals)
             + (" | useful under attack" if under else "") + " | utility | over-refusal |"
             + (" utility in Ombric |" if l2 else ""),
             "|---|---|" + "---|" * (len(goals) + under) + "---|---|" + ("---|" if l2 else "")]
    cells: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        cells.setdefault((r.family, r.defense), {})[r.goal] = r
    for (family, defense), by_goal in cells.items():
        u = (utility or {}).get(defense, {})
        shown = [percent(by_goal[g]) + f" (n={by_goal[g].n})" if g in by_goal else "-" for g in goals]
        if under:
            counted = [r for r in by_goal.values() if r.useful is not None]
            shown.append(f"{100 * counted[0].useful / max(counted[0].n, 1):.0f}%" if counted else "-")
        util = f"{100 * u['utility']:.0f}%" if "utility" in u else "-"
        over = f"{100 * u['over_refusal']:.0f}%" if "over_refusal" in u else "-"
        l2_util = (f" {100 * u['utility_l2']:.0f}% |" if "utility_l2" in u else " - |") if l2 else ""
        lines.append(f"| {family} | {defense} | " + " | ".join(shown) + f" | {util} | {over} |" + l2_util)
    return "\n".join(lines) + "\n"
