"""Rewards: scorers composed into one training signal (docs/architecture.md, docs/methods.md#transforms).

``RewardSpec`` holds the terms (scorer, weight, transform), the aggregation and the group advantages, and does every
post-processing step an update needs (NaN masks, Pareto selection, uncertainty weights). Scorers know nothing of it.
"""

from visalign.rewards.advantages import AdvantageConfig, GroupAdvantages, group_advantages
from visalign.rewards.aggregate import AGGREGATIONS, Aggregated, Aggregation, build_aggregation, list_aggregations
from visalign.rewards.spec import NoFiniteReward, RewardOutput, RewardSpec, RewardTerm, UpdateRewards
from visalign.rewards.transforms import TRANSFORMS, Transform, build_transform, list_transforms

__all__ = ["AGGREGATIONS", "AdvantageConfig", "Aggregated", "Aggregation", "GroupAdvantages", "NoFiniteReward",
           "RewardOutput", "RewardSpec", "RewardTerm", "TRANSFORMS", "Transform", "UpdateRewards",
           "build_aggregation", "build_transform", "group_advantages", "list_aggregations", "list_transforms"]
