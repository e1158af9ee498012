"""Presets: Python functions that return a whole pipeline's config (`llmlab.stages.speedrun.Config`).

`tiny` runs every stage in seconds (the tests use it); `cpu` is the main job on a 2-core laptop; `gpu-small`
is a GPT-2-small-class run on real web text for one or more GPUs. Each stage
command starts from its part of the preset (`llmlab pretrain --preset cpu` uses `cpu().pretrain`) and
flags override single fields.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from llmlab.errors import LLMLabError
from llmlab.model import GPTConfig
from llmlab.optim import OptimConfig
from llmlab.stages import chat, dpo, evaluate, feedback, pretrain, rl, rm, sample, scale, serve, sft, speedrun, tokenizer, world


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
        # fine-tuning: learning rates well below pretraining's, Muon's momentum at 0.95 from the start
        sft=sft.Config(base=str(run_dir / "base"), data=str(run_dir / "world"), out_dir=str(run_dir / "sft"),
                       replay=str(run_dir / "world"), replay_frac=0.125, batch_size=16, max_steps=300,
                       warmdown_frac=0.5, momentum_warmup_steps=0, eval_every=100, save_every=100,
                       optim=OptimConfig(muon_lr=0.01, embed_lr=0.05, head_lr=0.002, scalar_lr=0.005)),
        # alignment: from the assistant, a few hundred steps each, lower learning rates again
        # (comparisons at temperature 1.5, 8 replies each: at 1.0 the assistant's replies mostly agree, few pairs)
        rm=rm.Config(policy=str(run_dir / "sft"), world=str(run_dir / "world"), out_dir=str(run_dir / "rm"),
                     temperature=1.5, samples=8, pairs_per_prompt=4, prompts_per_family=100, likelihood_weight=0.3,
                     # (without pairs whose rejected reply was another family's, or a forbidden request's refusal,
                     # the reward model preferred a refusal to many benign replies, and RL against it learnt to
                     # refuse benign requests)
                     off_topic_pairs=1, refusal_pairs=1, batch_size=16, max_steps=150, warmdown_frac=0.5,
                     momentum_warmup_steps=0,
                     eval_every=25, save_every=50,
                     optim=OptimConfig(muon_lr=0.005, embed_lr=0.01, head_lr=0.005, scalar_lr=0.005)),
        dpo=dpo.Config(policy=str(run_dir / "sft"), world=str(run_dir / "world"), out_dir=str(run_dir / "dpo"),
                       pairs=str(run_dir / "rm" / "pairs" / "train.jsonl"),
                       heldout=str(run_dir / "rm" / "pairs" / "heldout.jsonl"), batch_size=16, max_steps=150,
                       judge_per_family=100,
                       # RPO: DPO alone lowered the chosen answers' likelihood too, and the assistant's small talk
                       # lost its words (47.6% and 57.5% against its start over two seeds; with it, three seeds 77%)
                       nll=1.0,
                       # (beta 0.1: 68.3 / 66.2 / 57.3% over three seeds, the python programs drifting further)
                       beta=0.3,
                       warmdown_frac=0.5, momentum_warmup_steps=0, eval_every=50, save_every=50,
                       # (at twice these rates both log-probabilities fall and DPO loses to its start)
                       optim=OptimConfig(muon_lr=0.001, embed_lr=0.004, head_lr=0.0002, scalar_lr=0.0004)),
        rl=rl.Config(policy=str(run_dir / "sft"), world=str(run_dir / "world"), out_dir=str(run_dir / "rl"),
                     reward=f"rm:{run_dir / 'rm'}", temperature=1.5, group_size=8, batch_size=8, max_steps=80,
                     # replies of up to 96 tokens (or the room their own prompt leaves), a reply cut off teaching
                     # nothing; at 48 the python family's programs, up to 90 tokens, were all cut off, and with
                     # nothing to hold them they drifted (three seeds: 67.4 / 62.0 / 59.2%; at 96: 67.6 / 66.7 /
                     # 80.0%, in some 35 s more)
                     max_new_tokens=96, mask_truncated=True,
                     # (KL weight 0.15 cost held-out people 3-4 points on the card in three RL seeds, 0.3 cost 2)
                     scale_advantages=True, beta=0.3,
                     # (a judge of 100 prompts per family: most are ties, and 40 left some 15 decisive ones)
                     judge_per_family=100,
                     warmdown_frac=0.5, momentum_warmup_steps=0, eval_every=20, save_every=40,
                     optim=OptimConfig(muon_lr=0.002, embed_lr=0.01, head_lr=0.0005, scalar_lr=0.001)),
        eval=evaluate.Config(checkpoint=str(run_dir / "sft"), world=str(run_dir / "world")),
        chat=chat.Config(checkpoint=str(run_dir / "sft"), world=str(run_dir / "world"), recall=str(run_dir / "base")),
        serve=serve.Config(checkpoint=str(run_dir / "sft"), world=str(run_dir / "world"), recall=str(run_dir / "base"),
                           db=str(run_dir / "feedback.db"), assistants=str(run_dir / "assistants")),
        feedback=feedback.Config(db=str(run_dir / "feedback.db"), out_dir=str(run_dir / "feedback")),
    )


def tiny(run: str = "runs/tiny") -> speedrun.Config:
    """Every stage in seconds: a world of a few dozen people and a 2-layer model of width 32."""
    world_cfg = world.Config(n_people=20, n_heldout=8, n_unknown=8, n_countries=4, n_cities=8, n_companies=6,
                             bios_per_person=3, stories_per_person=1, qa_pages=40, n_arithmetic=50, val_docs=30)
    model = GPTConfig(n_layer=2, d_model=32, n_head=2, n_kv_head=1, context_len=128, qk_norm=True)
    world_cfg.sft_conversations = 200
    cfg = _pipeline(run, world_cfg, 512, model, batch_size=4, max_steps=12, eval_every=6, eval_rows=4,
                    save_every=6)
    cfg.sft.batch_size, cfg.sft.max_steps, cfg.sft.eval_every, cfg.sft.eval_rows, cfg.sft.save_every = 4, 6, 3, 8, 3
    for stage in (cfg.rm, cfg.dpo, cfg.rl):
        stage.batch_size, stage.max_steps, stage.eval_every, stage.save_every = 4, 4, 2, 2
        stage.prompts_per_family, stage.judge_per_family, stage.max_new_tokens = 6, 4, 16
    cfg.rm.samples, cfg.rl.group_size, cfg.rl.eval_per_family = 4, 4, 2
    cfg.rl.mask_truncated = False  # (16 tokens cut off nearly every reply: masked, RL would learn nothing)
    cfg.eval_questions = 16
    cfg.assistant = True
    return cfg


def cpu(run: str = "runs/cpu") -> speedrun.Config:
    """The main job on a 2-core CPU: a few minutes of pretraining and of fine-tuning on the default world
    (README's figures give today's times and accuracies, measured by `make speedrun`).

    Sized by the machine: pretraining sees about 1.2M tokens, two to three epochs of the world, and the world is
    kept small enough (260 people) that each fact is read in some 40 paraphrases, which is what makes it
    extractable by questions.

    The vocabulary asks for more merges than the world's text has (BPE stops at about 2,630 tokens), so every
    word of the world, every person's first name and surname included, is a token, and a name the model never
    read falls apart into pieces: that is how a model this small tells a person it knows from a stranger (no
    block's state does; bench/knowledge_probe.py). With 2,048 tokens the merges ran out partway through the
    names, by frequency: training people's names, which the Q/A pages repeat, became whole tokens, held-out
    people's mostly did not, and the assistant said "I don't know" about held-out people as about invented
    names (README's figures compare the two vocabularies).
    """
    # (2,000 copying documents, lists of numbers said twice, are some 4% of the tokens: 15 more steps keep the
    # times the rest is read)
    world_cfg = world.Config(n_people=200, n_heldout=60, n_unknown=400, bios_per_person=16, stories_per_person=2,
                             qa_pages=1500, n_arithmetic=2000, val_docs=300, copy_docs=2000)
    model = GPTConfig(n_layer=4, d_model=128, n_head=2, n_kv_head=2, context_len=128, qk_norm=True)
    cfg = _pipeline(run, world_cfg, 4096, model, batch_size=32, max_steps=315, eval_every=100,
                    eval_rows=64, save_every=50, optim=OptimConfig(muon_lr=0.04, embed_lr=0.3, head_lr=0.01))
    # Reading (a passage after the question, answered from with a citation: custom assistants' files, long
    # documents, memory) is 28% of the conversations; 14,000 more of them, and 400 more steps (length-grouped
    # batches made steps 40% cheaper), keep the other kinds' counts and the times each is seen. Counting letters
    # asked three times as often as before (llmlab.world.skills.PYTHON_TASK_WEIGHTS) is another 2,700
    # conversations and 150 steps, the other kinds' counts kept again.
    cfg.world.sft_conversations, cfg.world.sft_reading = 46700, 0.6
    cfg.sft.max_steps, cfg.sft.eval_every, cfg.sft.save_every = 2550, 600, 300
    cfg.assistant = True
    cfg.align = True  # then a reward model (rm) and RLHF (rl) from the assistant
    return cfg


def gpu_small(run: str = "runs/gpu-small") -> speedrun.Config:
    """A GPT-2-small-class model (12 layers of width 768, 12 heads, context 1024: 124M parameters with a
    32k vocabulary, untied) pretrained on FineWeb-Edu with the world mixed in (5%, so the world's questions
    still measure knowledge), on one or more GPUs under torchrun:

        torchrun --standalone --nproc_per_node=8 -m llmlab speedrun --preset gpu-small

    batch_size is per GPU: 32 rows x 1024 tokens x 2 micro-batches x 8 GPUs = 524,288 tokens per step; with
    fewer GPUs raise grad_accum to keep it (4 GPUs: --pretrain.grad_accum 4). 5,000 steps = 2.6B tokens,
    about 20 tokens per parameter.
    """
    world_cfg = world.Config(n_people=2000, n_heldout=500, n_unknown=500, bios_per_person=16)
    model = GPTConfig(n_layer=12, d_model=768, n_head=12, n_kv_head=12, context_len=1024, qk_norm=True)
    cfg = _pipeline(run, world_cfg, 32768, model, batch_size=32, grad_accum=2, max_steps=5000, warmup_steps=0,
                    eval_every=250, eval_rows=512, save_every=500, compile=True)
    corpus = f"hf:HuggingFaceFW/fineweb-edu:sample-10BT*0.95,{cfg.world.out_dir}*0.05"
    cfg.tokenizer.corpus, cfg.tokenizer.max_chars = corpus, 2_000_000_000
    cfg.pretrain.corpus = cfg.sft.replay = corpus
    cfg.pretrain.log_every = cfg.sft.log_every = 10  # the host reads the loss every 10 steps, not after each
    return cfg


PRESETS: dict[str, Callable[..., speedrun.Config]] = {"tiny": tiny, "cpu": cpu, "gpu-small": gpu_small}


# ---- scaling sweeps (`llmlab scale`): not part of a speedrun, each with its own world and tokenizer ----------

def scale_tiny(run: str = "runs/scale-tiny") -> scale.Config:
    """A sweep in a minute, for the tests: 4 budgets x 3 sizes on a small world (the fits of runs this short are
    noise; the tests check the machinery)."""
    world_cfg = world.Config(n_people=80, n_heldout=20, n_unknown=4, n_countries=4, n_cities=8, n_companies=6,
                             bios_per_person=8, stories_per_person=1, qa_pages=400, n_arithmetic=1500, val_docs=60,
                             sft_conversations=0, arithmetic_digits=6)
    base = pretrain.Config(batch_size=4, eval_rows=8, model=GPTConfig(context_len=128, qk_norm=True),
                           optim=OptimConfig(muon_lr=0.04, embed_lr=0.3, head_lr=0.01))
    return scale.Config(run_dir=run, world=world_cfg, vocab_size=300, pretrain=base, budgets="1.5e9,3e9,6e9,1.2e10",
                        depths="1,2,3", aspect=16, head_dim=16, min_steps=4, bootstrap=20, ledger_items=4,
                        predict_factor=2.0)


def scale_cpu(run: str = "runs/scale-cpu") -> scale.Config:
    """The laptop sweep: 4 budgets, 2x apart, x 4 sizes each (depth 1-7 of width 16 per block, 2x apart in N;
    at each budget the 4 nearest a first guess of 8 tokens per parameter, which a pilot at 1e12 FLOPs put the
    optimum near) on a world three times the cpu preset's (its arithmetic up to 6 digits, for the ledger), with
    a 1,024-token vocabulary so that the LM head does not dwarf the smallest models. The largest budget's
    smallest model reads the world about 3 times."""
    world_cfg = world.Config(n_people=600, n_heldout=150, n_unknown=50, bios_per_person=40, stories_per_person=4,
                             qa_pages=12000, n_arithmetic=30000, val_docs=600, sft_conversations=0, arithmetic_digits=6)
    base = pretrain.Config(batch_size=16, eval_rows=128, model=GPTConfig(context_len=128, qk_norm=True),
                           optim=OptimConfig(muon_lr=0.04, embed_lr=0.3, head_lr=0.01))
    return scale.Config(run_dir=run, world=world_cfg, vocab_size=1024, pretrain=base, budgets="2.5e11,5e11,1e12,2e12",
                        depths="1,2,3,4,5,6,7", sizes_per_budget=4, tokens_per_param=8.0, aspect=16, head_dim=16)


def scale_gpu(run: str = "runs/scale-gpu") -> scale.Config:
    """A GPU sweep on the same world, 4 budgets x 6 sizes of width 64 per block (nanochat's aspect), one run
    per GPU at a time: `llmlab scale --preset gpu-small --jobs 8`."""
    cfg = scale_cpu(run)
    cfg.pretrain = dataclasses.replace(cfg.pretrain, batch_size=64, model=GPTConfig(context_len=512, qk_norm=True))
    cfg.budgets, cfg.depths, cfg.aspect, cfg.head_dim = "1e15,3e15,1e16,3e16", "2,4,6,8,10,12,14,16", 64, 64
    cfg.sizes_per_budget, cfg.tokens_per_param = 5, 20.0
    return cfg


STAGE_PRESETS: dict[str, dict[str, Callable[..., object]]] = {
    "scale": {"tiny": scale_tiny, "cpu": scale_cpu, "gpu-small": scale_gpu}}
"""stages outside the speedrun's pipeline whose presets are their own"""


def get(name: str, run: str | None = None) -> speedrun.Config:
    if name not in PRESETS:
        raise LLMLabError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]() if run is None else PRESETS[name](run)
