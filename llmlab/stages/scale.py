"""`llmlab scale`: scaling laws and emergence. Sweep model sizes at several compute budgets, fit how the loss
falls with parameters N and tokens D, predict a larger run before running it, and read each ability of the
world along the sweep under two metrics.

    llmlab scale sweep --preset cpu     the isoFLOP sweep (resumable; --jobs N processes, --shard i/n machines),
                                        then both fits, printing N_opt ~ C^a beside Chinchilla's and Kaplan's
    llmlab scale fit                    the fits of the sweep's runs again (approach 2: a parabola per budget;
                                        approach 3: L = E + A/N^alpha + B/D^beta), with bootstrap intervals
    llmlab scale fit --csv FILE         the same parametric fit of anyone's runs, e.g. Chinchilla's own points:
                                        --csv ../shared/reference/chinchilla_fig4_epoch.csv --drop_highest 5
    llmlab scale predict                fit the sweep, write down the loss it predicts for a run at 4x the largest
                                        budget, then train that run and compare
    llmlab scale ledger                 every model of the sweep on the world's abilities: exact match and the
                                        log-probability of the right answer, against compute
    llmlab scale report                 report.md and the plots from what the actions above wrote
    llmlab scale --preset cpu           all of it, in that order (sweep, predict, ledger, report)

Everything lands in --run_dir (default runs/scale-<preset>): world/, tokenizer/, runs/<cell>/, predict/<cell>/,
sweep.json, fit.json, prediction.json, ledger.json, report.md and the PNGs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llmlab import checkpoint
from llmlab.errors import LLMLabError
from llmlab.report import pyplot
from llmlab.scaling import emergence, fit, plots, sweep
from llmlab.stages import pretrain, tokenizer, world
from llmlab.tokenizer import Tokenizer
from llmlab.training import configure_torch

ACTIONS = ("all", "sweep", "fit", "predict", "ledger", "report")
EPOCH = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
"""Epoch AI's refit of Chinchilla's approach 3 on Chinchilla's own points (Besiroglu et al. 2024)"""
REFERENCE_A = {"Chinchilla (Hoffmann et al. 2022)": 0.50, "Kaplan et al. 2020": 0.73}
"""published exponents a of N_opt ~ C^a"""


@dataclass
class Config:
    action: str = "all"
    """all, sweep, fit, predict, ledger or report (`llmlab scale sweep` is --action sweep)"""
    run_dir: str = "runs/scale-cpu"
    """where the sweep's world, tokenizer, runs, fits, ledger and report go"""
    world: world.Config = field(default_factory=world.Config)
    """the sweep's world (its out_dir is run_dir/world)"""
    vocab_size: int = 1024
    """the sweep's tokenizer (one for every run: losses in nats per token compare only under one tokenizer)"""
    pretrain: pretrain.Config = field(default_factory=pretrain.Config)
    """every run's settings (batch, context, optimizer, evaluation rows); depth and width come from --depths"""
    budgets: str = "1e12,2e12,4e12,8e12"
    """compute budgets C = 6ND in FLOPs, comma-separated"""
    depths: str = "1,2,3,4,5"
    """model sizes: each depth gives depth blocks of width aspect x depth"""
    sizes_per_budget: int = 0
    """0: every depth at every budget; k: at each budget the k depths nearest a first guess of its optimum"""
    tokens_per_param: float = 20.0
    """that first guess: N = sqrt(C / (6 x tokens_per_param)) (Chinchilla's 20; only where sizes_per_budget > 0)"""
    aspect: int = 32
    """width per block of depth"""
    head_dim: int = 32
    """width of one attention head"""
    min_steps: int = 40
    """a cell with fewer optimizer steps is left out of its budget"""
    jobs: int = 1
    """runs trained at once, in separate processes (on GPUs one per device; on a 2-core CPU 1 is fastest)"""
    shard: str = "0/1"
    """i/n: train only every n-th cell starting at i (n machines sharing run_dir split one sweep)"""
    predict_factor: float = 4.0
    """the predicted run's budget, as a multiple of the largest budget"""
    csv: str = ""
    """fit: runs from a CSV (params,tokens,loss[,flops] or Epoch's Model Size,Training FLOP,loss) instead of the sweep"""
    drop_highest: int = 0
    """fit --csv: leave out the runs of highest loss (Epoch dropped Chinchilla's 5)"""
    bootstrap: int = 200
    """bootstrap resamples for the confidence intervals (0: none)"""
    ledger_items: int = 50
    """questions per ability in the emergence ledger"""
    threads: int = 0
    """CPU threads for torch (0 = follow the free cores)"""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise LLMLabError(f"scale: the action must be one of {', '.join(ACTIONS)} (got {self.action!r})")
        self.budget_list()
        self.depth_list()
        self.shard_pair()
        if self.predict_factor <= 1:
            raise LLMLabError(f"scale: --predict_factor must be above 1 (got {self.predict_factor})")
        if self.sizes_per_budget < 0 or self.tokens_per_param <= 0:
            raise LLMLabError("scale: --sizes_per_budget must be >= 0 and --tokens_per_param positive")
        for name in ("aspect", "head_dim", "min_steps", "jobs", "ledger_items"):
            if getattr(self, name) < 1:
                raise LLMLabError(f"scale: --{name} must be at least 1 (got {getattr(self, name)})")
        if self.bootstrap < 0 or self.drop_highest < 0:
            raise LLMLabError("scale: --bootstrap and --drop_highest must be >= 0")

    def budget_list(self) -> list[float]:
        try:
            values = sorted({float(v) for v in self.budgets.split(",") if v.strip()})
        except ValueError:
            raise LLMLabError(f"scale: --budgets must be comma-separated numbers of FLOPs (got {self.budgets!r})") from None
        if not values or any(not (math.isfinite(v) and v > 0) for v in values):
            raise LLMLabError(f"scale: --budgets must be positive FLOPs (got {self.budgets!r})")
        return values

    def depth_list(self) -> list[int]:
        try:
            values = sorted({int(v) for v in self.depths.split(",") if v.strip()})
        except ValueError:
            raise LLMLabError(f"scale: --depths must be comma-separated whole numbers (got {self.depths!r})") from None
        if not values or values[0] < 1:
            raise LLMLabError(f"scale: --depths must be positive (got {self.depths!r})")
        return values

    def shard_pair(self) -> tuple[int, int]:
        i, _, n = self.shard.partition("/")
        try:
            pair = int(i), int(n)
        except ValueError:
            pair = (-1, 0)
        if not 0 <= pair[0] < pair[1]:
            raise LLMLabError(f"scale: --shard must be i/n with 0 <= i < n (got {self.shard!r})")
        return pair


# ---- paths and set-up ------------------------------------------------------------------------------------------

def _paths(cfg: Config) -> dict[str, Path]:
    run = Path(cfg.run_dir)
    return {"run": run, "world": run / "world", "tokenizer": run / "tokenizer", "runs": run / "runs",
            "predict": run / "predict", "sweep": run / "sweep.json", "fit": run / "fit.json",
            "prediction": run / "prediction.json", "ledger": run / "ledger.json", "report": run / "report.md"}


def _base(cfg: Config) -> pretrain.Config:
    p = _paths(cfg)
    return dataclasses.replace(cfg.pretrain, corpus=str(p["world"]), tokenizer=str(p["tokenizer"]), threads=cfg.threads)


def _prepare(cfg: Config) -> None:
    """The sweep's world and tokenizer, made once."""
    p = _paths(cfg)
    world_cfg = dataclasses.replace(cfg.world, out_dir=str(p["world"]))
    if not world.is_done(world_cfg):
        print("== scale: the sweep's world")
        world.main(world_cfg)
    if not (p["tokenizer"] / "tokenizer.json").is_file():
        print("== scale: the sweep's tokenizer")
        tokenizer.main(tokenizer.Config(corpus=str(p["world"]), out_dir=str(p["tokenizer"]), vocab_size=cfg.vocab_size))


def _vocab(cfg: Config) -> int:
    return Tokenizer.load(_paths(cfg)["tokenizer"] / "tokenizer.json").vocab_size


def _cells(cfg: Config, vocab_size: int) -> tuple[list[sweep.Cell], list[str]]:
    return sweep.plan(_base(cfg), cfg.budget_list(), cfg.depth_list(), aspect=cfg.aspect, head_dim=cfg.head_dim,
                      vocab_size=vocab_size, runs_dir=_paths(cfg)["runs"], min_steps=cfg.min_steps,
                      per_budget=cfg.sizes_per_budget, tokens_per_param=cfg.tokens_per_param)


def _points(rows: list[dict], source: str) -> fit.Points:
    # C is the nominal budget: one budget's runs round their tokens to whole steps, and the parabola is per budget
    return fit.Points(np.array([r["params"] for r in rows], float), np.array([r["tokens"] for r in rows], float),
                      np.array([r["loss"] for r in rows], float), np.array([r["budget"] for r in rows], float), source)


# ---- actions ---------------------------------------------------------------------------------------------------

def do_sweep(cfg: Config) -> list[dict] | None:
    """Train this shard's cells; when every cell is trained, write sweep.json and fit."""
    _prepare(cfg)
    cells, skipped = _cells(cfg, _vocab(cfg))
    budgets = cfg.budget_list()
    sizes = f"{cfg.sizes_per_budget} of {len(cfg.depth_list())} sizes each" if cfg.sizes_per_budget else f"{len(cfg.depth_list())} sizes"
    print(f"scale: {len(budgets)} budgets x {sizes} -> {len(cells)} runs"
          + (f" ({len(skipped)} left out: {'; '.join(skipped)})" if skipped else ""))
    t0 = time.perf_counter()
    sweep.run(cells, jobs=cfg.jobs, shard=cfg.shard_pair())
    waiting = [c.name for c in cells if not sweep.finished(c)]
    if waiting:
        print(f"scale: {len(waiting)} cells of other shards are not trained yet; fit once every shard is done")
        return None
    rows = sweep.results(cells)
    sweep.write_rows(_paths(cfg)["sweep"], rows)
    print(f"scale: sweep done in {time.perf_counter() - t0:.0f} s ({sum(r['seconds'] or 0 for r in rows):.0f} s of "
          f"training in all) -> {_paths(cfg)['sweep']}")
    do_fit(cfg, rows)
    return rows


def _read_sweep(cfg: Config) -> list[dict]:
    path = _paths(cfg)["sweep"]
    if not path.is_file():
        raise LLMLabError(f"scale: no sweep results at {path}: run `llmlab scale sweep` (with the same --run_dir) first")
    rows = json.loads(path.read_text())
    sweep.check_one_tokenizer(rows)
    return rows


def fit_summary(points: fit.Points, bootstrap: int, isoflop: bool) -> dict:
    """Approach 3 (and approach 2 when the points are an isoFLOP sweep) with bootstrap intervals, as JSON."""
    out: dict = {}
    para = fit.fit_parametric(points)
    boot = fit.bootstrap_parametric(points, n=bootstrap, fit=para) if bootstrap else None
    out["parametric"] = {"E": para.E, "A": para.A, "B": para.B, "alpha": para.alpha, "beta": para.beta, "a": para.a,
                         "b": para.b, "objective": para.objective, "n_points": para.n_points,
                         "intervals": boot.intervals if boot else {}, "level": boot.level if boot else None}
    if isoflop:  # the budgets with 3 sizes or more (a parabola needs them; the parametric fit takes every run)
        sizes = {c: len(set(points.N[points.C == c])) for c in set(points.C.tolist())}
        points = points.take(np.array([sizes[c] >= 3 for c in points.C]))
        try:
            iso = fit.fit_isoflop(points)
        except LLMLabError as e:  # (no two budgets with a minimum inside their sizes: said, and approach 3 stands)
            out["isoflop"] = {"error": str(e)}
            return out
        iboot = fit.bootstrap_isoflop(points, n=max(bootstrap, 2) * 5) if bootstrap else None
        out["isoflop"] = {"a": iso.a, "b": iso.b, "k_n": iso.n_opt.k, "k_d": iso.d_opt.k, "used": list(iso.used),
                          "budgets": [_finite(dataclasses.asdict(b)) for b in iso.budgets],
                          "intervals": iboot.intervals if iboot else {}, "level": iboot.level if iboot else None}
    return out


def _finite(d: dict) -> dict:
    """NaN (a parabola without a minimum) as null: strict JSON has no NaN."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


def _print_fit(summary: dict, reference: dict | None) -> None:
    para = summary["parametric"]
    iv = para["intervals"]
    level = f"{100 * para['level']:.0f}% bootstrap interval" if para["level"] else "no bootstrap"
    print(f"approach 3, L(N, D) = E + A/N^alpha + B/D^beta, Huber (delta 1e-3) in log space, {para['n_points']} runs "
          f"[{level}]:")
    for name in ("E", "A", "B", "alpha", "beta"):
        ref = ""
        if reference:
            ref = f"   Epoch AI {reference[name]:.4g} ({100 * (para[name] / reference[name] - 1):+.1f}%)"
        lo_hi = f" [{iv[name][0]:.4g}, {iv[name][1]:.4g}]" if name in iv else ""
        print(f"  {name:<6} {para[name]:10.4g}{lo_hi}{ref}")
    refs = ", ".join(f"{k}: {v}" for k, v in REFERENCE_A.items())
    a_iv = f" [{iv['a'][0]:.3f}, {iv['a'][1]:.3f}]" if "a" in iv else ""
    print(f"  N_opt ~ C^a: a = {para['a']:.3f}{a_iv}   ({refs})")
    if "error" in summary.get("isoflop", {}):
        print(f"approach 2 not fitted: {summary['isoflop']['error']}")
    elif "isoflop" in summary:
        iso = summary["isoflop"]
        a_iv = f" [{iso['intervals']['a'][0]:.3f}, {iso['intervals']['a'][1]:.3f}]" if "a" in iso["intervals"] else ""
        flagged = [b for b in iso["budgets"] if b["status"] != fit.OK]
        print(f"approach 2, a parabola per isoFLOP budget ({len(iso['used'])} of {len(iso['budgets'])} budgets with a "
              f"minimum inside their sizes):")
        for b in iso["budgets"]:
            if b["N_opt"] is None:
                print(f"  C = {b['C']:.2g}: no minimum (the parabola opens downward)")
                continue
            print(f"  C = {b['C']:.2g}: N_opt = {b['N_opt']:,.0f}, D_opt = {b['D_opt']:,.0f} tokens "
                  f"({b['D_opt'] / b['N_opt']:.1f} tokens per parameter), loss {b['L_opt']:.4f}"
                  + ("" if b["status"] == fit.OK else f"  [{b['status'].replace('_', ' ')}]"))
        print(f"  N_opt ~ C^a: a = {iso['a']:.3f}{a_iv}   ({refs}); D_opt ~ C^b: b = {iso['b']:.3f}")
        if flagged:
            print(f"  ({len(flagged)} budget(s) flagged and left out of the exponent)")


def do_fit(cfg: Config, rows: list[dict] | None = None) -> dict:
    if cfg.csv:
        points = fit.drop_highest(fit.read_points(cfg.csv), cfg.drop_highest)
        print(f"scale fit: {len(points)} runs of {cfg.csv}" + (f" ({cfg.drop_highest} of highest loss left out)"
                                                               if cfg.drop_highest else ""))
        t0 = time.perf_counter()
        summary = fit_summary(points, cfg.bootstrap, isoflop=False)
        _print_fit(summary, EPOCH)
        print(f"({time.perf_counter() - t0:.1f} s)")
        return summary
    rows = rows if rows is not None else _read_sweep(cfg)
    summary = fit_summary(_points(rows, str(_paths(cfg)["sweep"])), cfg.bootstrap, isoflop=True)
    _print_fit(summary, None)
    _paths(cfg)["fit"].write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def do_predict(cfg: Config) -> dict:
    """Fit on the sweep, choose the compute-optimal size for predict_factor x the largest budget, write the
    prediction down, then train that run and compare."""
    p = _paths(cfg)
    rows = _read_sweep(cfg)
    path, vocab = p["prediction"], _vocab(cfg)

    def cell_of(budget: float, depth: int) -> sweep.Cell:
        return sweep.plan(_base(cfg), [budget], [depth], aspect=cfg.aspect, head_dim=cfg.head_dim, vocab_size=vocab,
                          runs_dir=p["predict"], min_steps=1)[0][0]

    if path.is_file():
        prediction = json.loads(path.read_text())
        cell = cell_of(prediction["budget"], prediction["depth"])
    else:
        points = _points(rows, str(p["sweep"]))
        para = fit.fit_parametric(points)
        budget = cfg.predict_factor * max(r["budget"] for r in rows)
        n_opt, source = _optimum(points, para, budget, rows)
        # the depth whose N is nearest the optimum (in log N): any depth, not only the sweep's
        depth = min(range(1, 4 * max(cfg.depth_list()) + 1),
                    key=lambda d: abs(math.log(sweep.compute_params(
                        sweep.shape(cfg.pretrain.model, d, cfg.aspect, cfg.head_dim, vocab)) / n_opt)))
        cell = cell_of(budget, depth)
        predicted = float(para.predict(cell.params, cell.tokens))
        prediction = {"budget": budget, "depth": depth, "params": cell.params, "tokens": cell.tokens, "n_opt": n_opt,
                      "n_opt_from": source,
                      "predicted_loss": predicted, "fit": {k: getattr(para, k) for k in ("E", "A", "B", "alpha", "beta")},
                      "fitted_on": [r["name"] for r in rows], "written": time.strftime("%Y-%m-%d %H:%M:%S")}
        path.write_text(json.dumps(prediction, indent=1) + "\n")
        print(f"scale predict: at C = {budget:.3g} {source} puts the optimum at N = {n_opt:,.0f}; the nearest size, depth "
              f"{depth} (N = {cell.params:,}) on D = {cell.tokens:,} tokens, should reach a loss of {predicted:.4f} "
              f"(written to {path} before training)")
    sweep.run([cell], jobs=1)
    row = sweep.results([cell])[0]
    if row["tokenizer"] != rows[0]["tokenizer"]:
        raise LLMLabError(f"scale predict: {cell.out_dir} was trained with another tokenizer than the sweep")
    prediction["measured_loss"] = row["loss"]
    prediction["row"] = row
    prediction["error"] = row["loss"] / prediction["predicted_loss"] - 1
    path.write_text(json.dumps(prediction, indent=1) + "\n")
    print(f"scale predict: predicted {prediction['predicted_loss']:.4f}, measured {row['loss']:.4f} "
          f"({100 * prediction['error']:+.2f}%)")
    return prediction


def _optimum(points: fit.Points, para: fit.ParametricFit, budget: float, rows: list[dict]) -> tuple[float, str]:
    """N_opt at `budget` and where it came from: the parametric fit; where its exponents have no optimum (a
    sweep too small or noisy), the isoFLOP power law; where neither exists, the largest budget's best size."""
    try:
        return float(para.compute_optimal(budget)[0]), "the parametric fit"
    except LLMLabError:
        pass
    try:
        return float(fit.fit_isoflop(points).n_opt.predict(budget)), "the isoFLOP power law (the parametric fit has none)"
    except LLMLabError:
        best = emergence.frontier(rows)[-1]
        return float(best["params"]), "the largest budget's best size (neither fit has an optimum)"


def do_ledger(cfg: Config) -> dict:
    """Every model of the sweep (and the predicted run) on the abilities; cached per run in ledger.json."""
    p = _paths(cfg)
    rows = _read_sweep(cfg)
    prediction = json.loads(p["prediction"].read_text()) if p["prediction"].is_file() else {}
    if "row" in prediction:
        rows = rows + [{**prediction["row"], "predicted_run": True}]
    items = emergence.abilities(str(p["world"]), cfg.ledger_items)
    ledger = json.loads(p["ledger"].read_text()) if p["ledger"].is_file() else {"runs": {}}
    if ledger.get("items") != cfg.ledger_items:
        ledger = {"items": cfg.ledger_items, "runs": {}}
    for r in tqdm([r for r in rows if r["name"] not in ledger["runs"]], desc="ledger", dynamic_ncols=True):
        folder = p["predict"] if r.get("predicted_run") else p["runs"]
        ckpt = checkpoint.load(folder / r["name"])
        ledger["runs"][r["name"]] = {"row": r, "abilities": emergence.measure(ckpt.model, ckpt.tokenizer, items)}
        p["ledger"].write_text(json.dumps(ledger, indent=1) + "\n")
    runs = [ledger["runs"][r["name"]] for r in rows]
    front = emergence.frontier([x["row"] for x in runs])
    by_name = {x["row"]["name"]: x for x in runs}
    ledger["frontier"] = [r["name"] for r in front]
    ledger["verdicts"] = {}
    for ability in items:
        if any(ability not in by_name[r["name"]]["abilities"] for r in front):
            continue  # (its questions do not fit these models' context)
        exact = [by_name[r["name"]]["abilities"][ability]["exact"] for r in front]
        logp = [by_name[r["name"]]["abilities"][ability]["logprob"] for r in front]
        ledger["verdicts"][ability] = emergence.verdict([r["flops"] for r in front], exact, logp)
        print(f"  {ability:<24} exact {' '.join(f'{100 * e:3.0f}%' for e in exact)}   log p "
              f"{' '.join(f'{v:6.2f}' for v in logp)}   {ledger['verdicts'][ability]['kind']}")
    p["ledger"].write_text(json.dumps(ledger, indent=1) + "\n")
    return ledger


# ---- report --------------------------------------------------------------------------------------------------

def do_report(cfg: Config) -> Path:
    p = _paths(cfg)
    rows = _read_sweep(cfg)
    summary = json.loads(p["fit"].read_text()) if p["fit"].is_file() else do_fit(cfg, rows)
    prediction = json.loads(p["prediction"].read_text()) if p["prediction"].is_file() else None
    ledger = json.loads(p["ledger"].read_text()) if p["ledger"].is_file() else None
    plt = pyplot()
    figures = plots.write_all(plt, p["run"], rows, summary, prediction, ledger)
    lines = [f"# Scaling laws and emergence: {p['run']}", ""]
    lines += _report_fit(rows, summary, prediction)
    if ledger:
        lines += ["", "## The emergence ledger", "",
                  f"{ledger['items']} questions per ability; the frontier is each budget's run of lowest validation "
                  "loss" + (" plus the predicted run" if prediction and "row" in prediction else "") + ".", "",
                  "| ability | exact match along the frontier | log p(answer) along the frontier | verdict |",
                  "|---|---|---|---|"]
        for ability, v in ledger["verdicts"].items():
            cols = [ledger["runs"][n]["abilities"][ability] for n in ledger["frontier"]]
            exact = " → ".join(f"{100 * c['exact']:.0f}%" for c in cols)
            logp = " → ".join(f"{c['logprob']:.2f}" for c in cols)
            lines.append(f"| {ability} | {exact} | {logp} | {v['text']} |")
    lines += [""] + [f"![{name}]({name})" for name in figures]
    p["report"].write_text("\n".join(lines) + "\n")
    print(f"scale: report -> {p['report']}")
    return p["report"]


def _report_fit(rows: list[dict], summary: dict, prediction: dict | None) -> list[str]:
    para, iso = summary["parametric"], summary.get("isoflop")
    iv = para["intervals"]

    def ci(d: dict, name: str) -> str:
        return f" [{d[name][0]:.3g}, {d[name][1]:.3g}]" if name in d else ""

    lines = [f"{len(rows)} runs; N counts every parameter but the input embedding, D the tokens trained on, C = 6ND; "
             "loss: validation nats per token.", "", "| run | N | D | tokens/param | C | loss |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["budget"], r["params"])):
        lines.append(f"| {r['name']} | {r['params']:,} | {r['tokens']:,} | {r['tokens'] / r['params']:.1f} | "
                     f"{r['flops']:.3g} | {r['loss']:.4f} |")
    lines += ["", "## Fits", "", "| quantity | approach 2 (isoFLOP parabolas) | approach 3 (parametric) | Chinchilla | Kaplan |",
              "|---|---|---|---|---|"]
    if iso and "error" in iso:
        lines.append(f"| a in N_opt ~ C^a | not fitted: {iso['error']} | {para['a']:.3f}{ci(iv, 'a')} | 0.50 | 0.73 |")
    elif iso:
        lines.append(f"| a in N_opt ~ C^a | {iso['a']:.3f}{ci(iso['intervals'], 'a')} | {para['a']:.3f}{ci(iv, 'a')} | 0.50 | 0.73 |")
        lines.append(f"| b in D_opt ~ C^b | {iso['b']:.3f}{ci(iso['intervals'], 'b')} | {para['b']:.3f}{ci(iv, 'b')} | 0.50 | 0.27 |")
    lines += ["", f"L(N, D) = {para['E']:.4g} + {para['A']:.4g} / N^{para['alpha']:.3f} + {para['B']:.4g} / D^{para['beta']:.3f}"
              + (f" (intervals: {int(100 * para['level'])}% bootstrap)" if para["level"] else "")]
    if prediction and "measured_loss" in prediction:
        lines += ["", "## Prediction", "",
                  f"Fitted on the {len(prediction['fitted_on'])} runs above, the parametric fit predicted a loss of "
                  f"{prediction['predicted_loss']:.4f} for depth {prediction['depth']} (N = {prediction['params']:,}) on "
                  f"{prediction['tokens']:,} tokens, C = {prediction['budget']:.3g} ({prediction['written']}, before the "
                  f"run); measured: {prediction['measured_loss']:.4f} ({100 * prediction['error']:+.2f}%)."]
    return lines


def main(cfg: Config) -> dict:
    configure_torch(cfg.threads)
    if cfg.action == "fit":
        return do_fit(cfg)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    if cfg.action == "sweep":
        return {"rows": do_sweep(cfg)}
    if cfg.action == "predict":
        return do_predict(cfg)
    if cfg.action == "ledger":
        return do_ledger(cfg)
    if cfg.action == "report":
        return {"report": str(do_report(cfg))}
    t0 = time.perf_counter()
    if do_sweep(cfg) is None:
        return {}
    out = {"prediction": do_predict(cfg), "ledger": do_ledger(cfg), "report": str(do_report(cfg))}
    print(f"scale: all done in {time.perf_counter() - t0:.0f} s")
    return out
