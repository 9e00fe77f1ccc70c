"""The text-side RLHF core on the visual engine (docs/methods.md#text-core).

A causal-LM policy (:mod:`visalign.text.policy`) stands where a generator adapter stands: the engine
(:class:`visalign.train.loop.Trainer`) trains it with the same optimizer, checkpoints, evaluation and scorer
registry. Text experience sources (``text-online``: sample G completions per prompt and score them; ``text-pairs``:
read preference pairs) hand typed batches (:mod:`visalign.text.batches`) to the text objectives ``text-grpo``
(loss types grpo / dr_grpo / dapo / bnpo), ``text-rloo``, ``text-dpo`` (with RPO's SFT term) and
``text-best-of-n`` (RAFT). Rewards are any registered text scorer or a TRL reward function
(:mod:`visalign.text.rewards`). Importing this package imports nothing heavy.
"""
