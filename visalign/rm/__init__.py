"""Reward-model training and evaluation (``visalign rm``): the loss table (losses.py) and one file per loss family
(bt.py, ties.py, gaussian.py, verdict.py), pair building (pairs.py), data tables (data.py), metrics (metrics.py)
and the yes-token VLM trainer (yes_token.py). Math in docs/methods.md#reward-models."""
