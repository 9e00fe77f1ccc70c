"""Reward-model training and evaluation: losses (losses.py), pair building (pairs.py), metrics (metrics.py),
and the yes-token VLM trainer (yes_token.py). Math in docs/methods.md#rm-losses."""
