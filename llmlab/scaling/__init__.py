"""Scaling laws: how loss falls with parameters N and training tokens D, how to split a FLOP budget C = 6ND, and
which abilities seem to switch on along the way.

    sweep        the isoFLOP grid: budgets x sizes (one depth knob), each a normal pretraining run in its own
                 directory; resumable, in parallel processes or shards across machines
    fit          the fitters: a run table from CSV, Chinchilla's Approach 3 (the parametric loss
                 L(N, D) = E + A/N^alpha + B/D^beta, fitted as Epoch AI's replication did) and Approach 2
                 (isoFLOP parabolas), the compute-optimal N_opt(C) and D_opt(C), bootstrap intervals
    emergence    the ledger: the world's abilities on every model, exact match beside the log-probability of
                 the right answer, and a verdict per ability along the compute frontier
    plots        the pictures of all of it
"""
