"""`llmlab scale` on the tiny preset: the sweep's plan and resumption, shards, the prediction written before its
run, the ledger's metrics and verdicts, and the errors of bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from llmlab import checkpoint, presets
from llmlab.errors import LLMLabError
from llmlab.model import GPT, GPTConfig
from llmlab.scaling import emergence, sweep
from llmlab.stages import pretrain, scale
from llmlab.tasks.knowledge import continuation_logprobs


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The tiny preset's whole scale run (sweep, fits, prediction, ledger, report), once per module."""
    cfg = presets.scale_tiny(str(tmp_path_factory.mktemp("scale") / "tiny"))
    out = scale.main(cfg)
    return cfg, out


def _cells(cfg):
    return scale._cells(cfg, scale._vocab(cfg))[0]


def test_every_cell_trains_its_budget_at_its_size(swept):
    cfg, _ = swept
    rows = json.loads((scale._paths(cfg)["sweep"]).read_text())
    cells = _cells(cfg)
    assert len(rows) == len(cells) >= 12
    assert {r["budget"] for r in rows} == set(cfg.budget_list())
    for r, c in zip(rows, cells):
        info = checkpoint.read_info(c.out_dir)
        assert info["step"] == c.steps and info["tokens_seen"] == r["tokens"]
        model = checkpoint.load_model_config(c.out_dir)
        assert (model.n_layer, model.d_model) == (c.depth, cfg.aspect * c.depth)
        assert abs(r["flops"] / r["budget"] - 1) < 1 / cfg.min_steps  # whole steps: within one step of the budget
    for budget in cfg.budget_list():
        assert len({r["params"] for r in rows if r["budget"] == budget}) >= 3


def test_a_finished_sweep_trains_nothing_and_a_lost_cell_is_retrained_alone(swept, monkeypatch):
    cfg, _ = swept
    cells = _cells(cfg)
    trained = []
    monkeypatch.setattr(pretrain, "main", lambda c: trained.append(c.out_dir))
    assert sweep.run(cells) == [] and trained == []
    # a cell whose run was killed before its first checkpoint: only it trains again
    lost = cells[3]
    (lost.out_dir / "latest").rename(lost.out_dir / "latest.bak")
    try:
        assert [c.name for c in sweep.run(cells)] == [lost.name] and trained == [str(lost.out_dir)]
    finally:
        (lost.out_dir / "latest.bak").rename(lost.out_dir / "latest")


def test_shards_split_the_cells_without_overlap(swept, monkeypatch):
    cfg, _ = swept
    cells = _cells(cfg)
    monkeypatch.setattr(sweep, "finished", lambda c: False)
    monkeypatch.setattr(pretrain, "main", lambda c: None)
    parts = [{c.name for c in sweep.run(cells, shard=(i, 3))} for i in range(3)]
    assert set.union(*parts) == {c.name for c in cells}
    assert sum(map(len, parts)) == len(cells)


def test_a_cell_dir_holding_another_plan_is_refused(swept):
    cfg, _ = swept
    cell = _cells(cfg)[0]
    other = dataclasses.replace(cell, steps=cell.steps + 1)
    with pytest.raises(LLMLabError, match="another plan"):
        sweep.finished(other)


def test_sizes_follow_the_budget_when_chosen_per_budget(tmp_path):
    cfg = presets.scale_cpu(str(tmp_path))
    base = scale._base(cfg)
    cells, _ = sweep.plan(base, [1e11, 1e12, 1e13], list(range(1, 8)), aspect=16, head_dim=16, vocab_size=1024,
                          runs_dir=tmp_path, min_steps=1, per_budget=3, tokens_per_param=8.0)
    depths = {b: [c.depth for c in cells if c.budget == b] for b in (1e11, 1e12, 1e13)}
    assert all(len(d) == 3 and d == sorted(d) for d in depths.values())
    assert max(depths[1e11]) < max(depths[1e13]) and min(depths[1e11]) < min(depths[1e13])


def test_budgets_too_small_for_every_size_name_the_budget(tmp_path):
    cfg = presets.scale_tiny(str(tmp_path))
    with pytest.raises(LLMLabError, match=r"budget 1e\+06 FLOPs is too small for every size.*needs at least"):
        sweep.plan(scale._base(cfg), [1e6], [1, 2], aspect=16, head_dim=16, vocab_size=300, runs_dir=tmp_path,
                   min_steps=4)


def test_runs_of_different_tokenizers_do_not_mix(swept, tmp_path):
    cfg, _ = swept
    rows = json.loads((scale._paths(cfg)["sweep"]).read_text())
    rows[2]["tokenizer"] = "0123456789ab"
    with pytest.raises(LLMLabError, match="different tokenizers"):
        sweep.check_one_tokenizer(rows)


def test_the_prediction_is_written_before_its_run_and_compared_after(swept):
    cfg, out = swept
    prediction = json.loads(scale._paths(cfg)["prediction"].read_text())
    assert prediction["budget"] == pytest.approx(cfg.predict_factor * max(cfg.budget_list()))
    assert prediction["fitted_on"] == [r["name"] for r in json.loads(scale._paths(cfg)["sweep"].read_text())]
    run_dir = scale._paths(cfg)["predict"] / prediction["row"]["name"]
    assert prediction["measured_loss"] == checkpoint.read_info(run_dir)["metrics"]["val_loss"]
    assert prediction["error"] == pytest.approx(prediction["measured_loss"] / prediction["predicted_loss"] - 1)


def test_a_prediction_survives_a_failed_run(swept, tmp_path, monkeypatch):
    cfg, _ = swept
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path / "copy"))
    paths = scale._paths(cfg)
    paths["run"].mkdir()
    for name in ("world", "tokenizer"):
        (paths["run"] / name).symlink_to(scale._paths(swept[0])[name])
    paths["sweep"].write_text(scale._paths(swept[0])["sweep"].read_text())
    monkeypatch.setattr(sweep, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        scale.do_predict(cfg)
    written = json.loads(paths["prediction"].read_text())
    assert written["predicted_loss"] > 0 and "measured_loss" not in written


def test_continuation_logprobs_of_a_padded_batch_equal_one_sequence_at_a_time():
    class Tok:
        pad_id = 0

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, d_model=32, n_head=2, n_kv_head=2, context_len=32))
    model.init_weights(seed=0)
    model.eval()
    pairs = [([1, 5, 7], [9, 9, 3]), ([2], [4]), ([1, 2, 3, 4, 5, 6], [7, 8])]
    batched = continuation_logprobs(model, Tok(), pairs)
    for (prefix, cont), value in zip(pairs, batched):
        logp = torch.log_softmax(model(torch.tensor([prefix + cont])).float(), -1)[0]
        alone = sum(logp[len(prefix) + i - 1, t].item() for i, t in enumerate(cont))
        assert value.item() == pytest.approx(alone, abs=1e-5)


def test_the_ledger_measures_every_run_and_reads_the_frontier(swept):
    cfg, _ = swept
    ledger = json.loads(scale._paths(cfg)["ledger"].read_text())
    rows = json.loads(scale._paths(cfg)["sweep"].read_text())
    assert set(ledger["runs"]) == {r["name"] for r in rows} | {json.loads(scale._paths(cfg)["prediction"].read_text())["row"]["name"]}
    assert set(ledger["verdicts"]) == set(emergence.abilities(str(scale._paths(cfg)["world"]), cfg.ledger_items))
    for run in ledger["runs"].values():
        for m in run["abilities"].values():
            assert 0 <= m["exact"] <= 1 and m["logprob"] < 0 and m["n"] == cfg.ledger_items
    # the frontier is each budget's lowest loss, in order of compute
    front = [ledger["runs"][n]["row"] for n in ledger["frontier"]]
    assert [r["budget"] for r in front] == sorted(r["budget"] for r in front)
    for r in front:
        same = [x["row"]["loss"] for x in ledger["runs"].values() if x["row"]["budget"] == r["budget"]]
        assert r["loss"] == min(same)


def test_the_report_has_the_fits_the_prediction_and_the_pictures(swept):
    cfg, _ = swept
    text = scale._paths(cfg)["report"].read_text()
    for part in ("## Fits", "## Prediction", "## The emergence ledger", "isoflop.png", "frontier.png", "ledger.png"):
        assert part in text
    for png in ("isoflop.png", "frontier.png", "contours.png", "ledger.png"):
        assert (scale._paths(cfg)["run"] / png).stat().st_size > 10_000


@pytest.mark.parametrize("exact, logprob, kind", [
    ([0.0, 0.0, 0.02, 0.6, 0.7], [-9.0, -7.0, -5.0, -3.5, -1.5], "mirage"),  # EM jumps, log p rises evenly
    ([0.0, 0.0, 0.02, 0.6, 0.7], [-9.0, -8.9, -8.8, -3.0, -2.8], "jump"),  # both jump at the same step
    ([0.1, 0.3, 0.5, 0.7, 0.9], [-5.0, -4.0, -3.0, -2.0, -1.0], "smooth"),
    ([0.0, 0.0, 0.02, 0.04, 0.05], [-12.0, -11.0, -10.0, -9.5, -9.0], "not yet"),
    ([0.12, 0.06, 0.18, 0.1, 0.06], [-3.8, -3.3, -3.1, -3.1, -3.0], "flat"),  # noise around a level, no trend
])
def test_verdicts_on_made_up_frontiers(exact, logprob, kind):
    flops = [1e12 * 2 ** k for k in range(5)]
    assert emergence.verdict(flops, exact, logprob)["kind"] == kind


def test_a_jump_is_per_doubling_of_compute():
    """The same rise of exact match is a jump over 2x compute and not over 64x."""
    exact, logprob = [0.0, 0.05, 0.3], [-6.0, -5.0, -4.0]
    assert emergence.verdict([1e12, 2e12, 4e12], exact, logprob)["kind"] == "mirage"
    assert emergence.verdict([1e12, 2e12, 1.28e14], exact, logprob)["kind"] == "smooth"


def test_bad_flags_are_named(tmp_path):
    for bad, match in ((dict(budgets="1e12,abc"), "--budgets"), (dict(depths="0,1"), "--depths"),
                       (dict(shard="2/2"), "--shard"), (dict(action="swep"), "action"),
                       (dict(predict_factor=1.0), "--predict_factor")):
        with pytest.raises(LLMLabError, match=match):
            dataclasses.replace(presets.scale_tiny(str(tmp_path)), **bad)


def test_fit_of_a_csv_without_the_columns_names_them(tmp_path):
    bad = tmp_path / "runs.csv"
    bad.write_text("size,loss\n1e6,3.2\n")
    cfg = dataclasses.replace(presets.scale_tiny(str(tmp_path / "run")), action="fit", csv=str(bad))
    with pytest.raises(LLMLabError, match="params.*tokens.*loss"):
        scale.main(cfg)
    assert not (tmp_path / "run").exists()  # a CSV fit writes nothing into a run directory


def test_cells_trained_in_parallel_processes_equal_cells_trained_in_turn(swept, tmp_path):
    """--jobs 2 (spawned workers, one thread each) gives the same weights as one process, cell by cell."""
    from safetensors.torch import load_file

    cfg, _ = swept
    base = dataclasses.replace(scale._base(cfg), threads=1)
    plan = lambda where: sweep.plan(base, [2e9], [1, 2], aspect=cfg.aspect, head_dim=cfg.head_dim,  # noqa: E731
                                    vocab_size=scale._vocab(cfg), runs_dir=tmp_path / where, min_steps=1)[0]
    alone, together = plan("alone"), plan("together")
    sweep.run(alone, jobs=1)
    sweep.run(together, jobs=2)
    for a, b in zip(alone, together):
        wa = load_file(checkpoint.resolve(a.out_dir) / "model.safetensors")
        wb = load_file(checkpoint.resolve(b.out_dir) / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
