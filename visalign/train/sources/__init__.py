"""Experience sources of the training engine: ``online`` (sample → score → advantages), ``pairs`` (offline
preference pairs) and ``teacher`` (teacher ODE trajectories for a few-step student). A source declares the batch
type it ``produces`` and the needs it ``provides``; an objective declares what it ``consumes`` and ``needs``;
:func:`check_compatible` compares the two before any model loads."""

from __future__ import annotations

from visalign.registry import Registry
from visalign.train.sources.base import ExperienceSource, SourceContext

__all__ = ["SOURCES", "ExperienceSource", "SourceContext", "check_compatible", "source_class"]

SOURCES: Registry[type[ExperienceSource]] = Registry("experience source", {
    "online": "visalign.train.sources.online:OnlineSource",
    "pairs": "visalign.train.sources.pairs:PairsSource",
    "text-online": "visalign.text.source:TextOnlineSource",
    "text-pairs": "visalign.text.pairs:TextPairsSource",
    "teacher": "visalign.train.sources.teacher:TeacherSource",
})


def source_class(name: str) -> type[ExperienceSource]:
    """The source class of an id (``online``, ``pairs``) or ``"pkg.module:Class"``; unknown ids list the known."""
    return SOURCES.get(name)


def check_compatible(source: type[ExperienceSource], objective: type) -> None:
    """Raise ``ValueError`` when ``objective`` cannot train on what ``source`` produces, naming what to change.

    Args:
        source: an :class:`ExperienceSource` subclass.
        objective: an :class:`visalign.objectives.base.Objective` subclass.
    """
    consumes = objective.consumes
    if not issubclass(source.produces, consumes):
        hint = f"; it trains on source '{objective.default_source}'" if objective.default_source != source.name else ""
        raise ValueError(f"objective {objective.name!r} consumes {consumes.__name__}, but source {source.name!r} "
                         f"produces {source.produces.__name__}{hint}. Set source.name={objective.default_source} or "
                         "pick an objective for this source.")
    missing = sorted(set(objective.needs) - set(source.provides))
    if missing:
        raise ValueError(f"objective {objective.name!r} needs {missing}, which source {source.name!r} does not "
                         f"provide (it provides {sorted(source.provides)}).")
