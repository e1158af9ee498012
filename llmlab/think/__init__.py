"""System 2: spending more compute at inference for better answers.

    strategies   one interface, `Thinker.answer(messages, strategy, budget)`: greedy, self-consistency (vote),
                 vote among the replies that claim an answer (claim), best-of-N with an outcome verifier,
                 best-of-N and step-level beam search with a process verifier, verify-then-answer; each reports
                 the compute it used
    verifiers    the verifiers' training data: attempts sampled from the assistant and labelled exactly by the
                 task (whole attempts for an outcome verifier, every step for a process one); `llmlab rm`
                 trains them on it as reward models
"""
