"""Alignment: learning from comparisons and from rewards, on the shared training loop and the one engine.

    losses      Bradley-Terry, DPO, the policy gradient with a per-token KL penalty, as loop Objectives
    pairs       comparisons sampled from an assistant and labelled by the gold scorer; the pair loader
    rollouts    on-policy rollouts through the engine (tools included) and the rewards that score them

The stages over them: `llmlab rm` (reward model), `llmlab dpo`, `llmlab rl` (RLHF and verifiable rewards).
"""
