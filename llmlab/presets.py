"""Presets: Python functions that return a whole pipeline's config (`llmlab.stages.speedrun.Config`).

`tiny` runs every stage in seconds (the tests use it); `cpu` is the main job on a 2-core laptop. Each stage
command starts from its part of the preset (`llmlab pretrain --preset cpu` uses `cpu().pretrain`) and
flags override single fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from llmlab.errors import LLMLabError
from llmlab.model import GPTConfig
from llmlab.optim import OptimConfig
from llmlab.stages import pretrain, sample, speedrun, tokenizer, world


def _pipeline(run: str, world_cfg: world.Config, vocab_size: int, model: GPTConfig, **pretrain_kwargs) -> speedrun.Config:
    """Wire the stages of one run directory together: world -> tokenizer -> base checkpoint."""
    run_dir = Path(run)
    world_cfg.out_dir = str(run_dir / "world")
    return speedrun.Config(
        run_dir=str(run_dir),
        world=world_cfg,
        tokenizer=tokenizer.Config(corpus=str(run_dir / "world"), out_dir=str(run_dir / "tokenizer"), vocab_size=vocab_size),
        pretrain=pretrain.Config(corpus=str(run_dir / "world"), tokenizer=str(run_dir / "tokenizer"),
                                 out_dir=str(run_dir / "base"), model=model, **pretrain_kwargs),
        sample=sample.Config(checkpoint=str(run_dir / "base")),
    )


def tiny(run: str = "runs/tiny") -> speedrun.Config:
    """Every stage in seconds: a world of a few dozen people and a 2-layer model of width 32."""
    world_cfg = world.Config(n_people=20, n_heldout=8, n_unknown=8, n_countries=4, n_cities=8, n_companies=6,
                             bios_per_person=3, stories_per_person=1, qa_pages=40, n_arithmetic=50, val_docs=30)
    model = GPTConfig(n_layer=2, d_model=32, n_head=2, n_kv_head=1, context_len=64, qk_norm=True)
    cfg = _pipeline(run, world_cfg, 512, model, batch_size=4, max_steps=12, eval_every=6, eval_rows=4,
                    save_every=6)
    cfg.eval_questions = 16
    return cfg


def cpu(run: str = "runs/cpu") -> speedrun.Config:
    """The main job on a 2-core CPU: about 5 minutes of pretraining on the default world.

    Sized by the machine: a 2-core CPU trains a model this size at about 4k tokens/s, so pretraining sees
    about 1.2M tokens, two to three epochs of the world; the world is kept small enough (260 people) that each
    fact is read in some 40 paraphrases, which is what makes it extractable by questions.
    """
    world_cfg = world.Config(n_people=200, n_heldout=60, n_unknown=100, bios_per_person=16, stories_per_person=2,
                             qa_pages=1500, n_arithmetic=2000, val_docs=300)
    model = GPTConfig(n_layer=4, d_model=128, n_head=2, n_kv_head=2, context_len=128, qk_norm=True)
    return _pipeline(run, world_cfg, 2048, model, batch_size=32, max_steps=300, eval_every=100,
                     eval_rows=64, save_every=50, optim=OptimConfig(muon_lr=0.04, embed_lr=0.3, head_lr=0.01))


PRESETS: dict[str, Callable[..., speedrun.Config]] = {"tiny": tiny, "cpu": cpu}


def get(name: str, run: str | None = None) -> speedrun.Config:
    if name not in PRESETS:
        raise LLMLabError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]() if run is None else PRESETS[name](run)
