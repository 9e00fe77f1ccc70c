"""The shapes world's prompt grammar: captions from templates with paraphrases, and the exact inverse.

Every template is a string with named slots (``"{count} {shapes} that are {colour}"``). The same template
list both *writes* captions (:func:`caption`, :func:`all_captions`) and *reads* them back (:func:`parse_prompt`)
through one regular expression per template, so anything the grammar can say, the oracle can grade from
the prompt text alone. Paraphrases vary the wording, never the meaning: "to the left of", "left of" and
"on the left of" all parse to the relation ``left_of``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from visalign.shapes.world import (
    COLOURS,
    DIRECTIONS,
    RELATIONS,
    SHAPES,
    CountPrompt,
    MotionPrompt,
    PromptSpec,
    RelationPrompt,
    Thing,
)

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left_of": ("to the left of", "left of", "on the left of"),
    "right_of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
DIRECTION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left", "to the left", "leftwards"),
    "right": ("right", "to the right", "rightwards"),
    "up": ("up", "upwards"),
    "down": ("down", "downwards"),
}
assert set(RELATION_WORDS) == set(RELATIONS) and set(DIRECTION_WORDS) == set(DIRECTIONS)

# kind → templates. "single" is count 1; "count" is counts 2-4. The first template of each kind is canonical.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "single": ("a {colour} {shape}", "one {colour} {shape}", "a single {colour} {shape}", "a {shape} that is {colour}",
               "a picture of a {colour} {shape}"),
    "count": ("{count} {colour} {shapes}", "{count} {shapes} that are {colour}", "exactly {count} {colour} {shapes}",
              "a picture of {count} {colour} {shapes}"),
    "relation": ("a {colour} {shape} {rel} a {colour2} {shape2}", "a {colour} {shape} is {rel} a {colour2} {shape2}",
                 "a picture of a {colour} {shape} {rel} a {colour2} {shape2}"),
    "motion": ("a {colour} {shape} moving {dir}", "a {colour} {shape} that moves {dir}",
               "a {colour} {shape} sliding {dir}", "a video of a {colour} {shape} moving {dir}"),
}


def _alternation(name: str, words: list[str]) -> str:
    # Longest first so "to the left of" is not cut short by "left of".
    return f"(?P<{name}>" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


_SLOTS: dict[str, str] = {
    "colour": _alternation("colour", list(COLOURS)),
    "colour2": _alternation("colour2", list(COLOURS)),
    "shape": _alternation("shape", list(SHAPES)),
    "shape2": _alternation("shape2", list(SHAPES)),
    "shapes": _alternation("shapes", list(PLURALS.values())),
    "count": _alternation("count", [w for n, w in NUMBER_WORDS.items() if n > 1]),
    "rel": _alternation("rel", [w for ws in RELATION_WORDS.values() for w in ws]),
    "dir": _alternation("dir", [w for ws in DIRECTION_WORDS.values() for w in ws]),
}
_SLOT_RE = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Template:
    """One caption pattern of one prompt kind; writes captions and reads them back."""

    kind: str
    text: str

    @cached_property
    def regex(self) -> re.Pattern[str]:
        parts, last = [], 0
        for m in _SLOT_RE.finditer(self.text):
            parts.append(re.escape(self.text[last:m.start()]))
            parts.append(_SLOTS[m.group(1)])
            last = m.end()
        parts.append(re.escape(self.text[last:]))
        return re.compile("".join(parts))

    def parse(self, text: str) -> PromptSpec | None:
        """The spec of a normalised caption if this template produced it, else None."""
        m = self.regex.fullmatch(text)
        if m is None:
            return None
        g = m.groupdict()
        if self.kind == "single":
            return CountPrompt(Thing(g["colour"], g["shape"]), 1)
        if self.kind == "count":
            shape = next(s for s, p in PLURALS.items() if p == g["shapes"])
            count = next(n for n, w in NUMBER_WORDS.items() if w == g["count"])
            return CountPrompt(Thing(g["colour"], shape), count)
        if self.kind == "relation":
            rel = next(r for r, ws in RELATION_WORDS.items() if g["rel"] in ws)
            first, second = Thing(g["colour"], g["shape"]), Thing(g["colour2"], g["shape2"])
            if first == second:
                return None  # "a red circle left of a red circle" is not a world prompt
            return RelationPrompt(first, rel, second)
        direction = next(d for d, ws in DIRECTION_WORDS.items() if g["dir"] in ws)
        return MotionPrompt(Thing(g["colour"], g["shape"]), direction)

    def fill(self, spec: PromptSpec, paraphrase: int = 0) -> str:
        """This template's caption of ``spec``, using the ``paraphrase``-th wording of its relation/direction."""
        if _kind_of(spec) != self.kind:
            raise ValueError(f"Template {self.text!r} is for {self.kind} prompts, not {spec}.")
        slots: dict[str, str] = {}
        if isinstance(spec, CountPrompt):
            slots = {"colour": spec.thing.colour, "shape": spec.thing.shape, "shapes": PLURALS[spec.thing.shape],
                     "count": NUMBER_WORDS[spec.count]}
        elif isinstance(spec, RelationPrompt):
            words = RELATION_WORDS[spec.relation]
            slots = {"colour": spec.first.colour, "shape": spec.first.shape, "colour2": spec.second.colour,
                     "shape2": spec.second.shape, "rel": words[paraphrase % len(words)]}
        else:
            words = DIRECTION_WORDS[spec.direction]
            slots = {"colour": spec.thing.colour, "shape": spec.thing.shape, "dir": words[paraphrase % len(words)]}
        return self.text.format(**slots)


ALL_TEMPLATES: tuple[Template, ...] = tuple(Template(k, t) for k, ts in TEMPLATES.items() for t in ts)


def _kind_of(spec: PromptSpec) -> str:
    return spec.kind


def _paraphrase_count(spec: PromptSpec) -> int:
    if isinstance(spec, RelationPrompt):
        return len(RELATION_WORDS[spec.relation])
    if isinstance(spec, MotionPrompt):
        return len(DIRECTION_WORDS[spec.direction])
    return 1


def all_captions(spec: PromptSpec) -> list[str]:
    """Every caption the grammar can write for ``spec`` (each template x each wording), in a fixed order."""
    return [t.fill(spec, p) for t in ALL_TEMPLATES if t.kind == _kind_of(spec) for p in range(_paraphrase_count(spec))]


def canonical_caption(spec: PromptSpec) -> str:
    """The first template's first wording: "a red circle", "two blue squares", "a red circle left of ..."."""
    return all_captions(spec)[0]


def caption(spec: PromptSpec, rng: np.random.Generator | None = None) -> str:
    """One caption of ``spec``: uniformly among :func:`all_captions` when ``rng`` is given, else canonical."""
    options = all_captions(spec)
    return options[int(rng.integers(len(options)))] if rng is not None else options[0]


def normalise_prompt(prompt: str) -> str:
    """Lower-case, collapse white space and drop a final full stop: the only liberties the parser takes."""
    return " ".join(prompt.lower().split()).rstrip(".").strip()


_PARSE_CACHE: dict[str, PromptSpec] = {}


def parse_prompt(prompt: str) -> PromptSpec:
    """The structured spec of any caption the grammar can write (case and spacing are ignored).

    Raises:
        ValueError: naming the prompt and showing example captions when no template matches.
    """
    if prompt in _PARSE_CACHE:
        return _PARSE_CACHE[prompt]
    text = normalise_prompt(prompt)
    found = {spec for t in ALL_TEMPLATES if (spec := t.parse(text)) is not None}
    if not found:
        raise ValueError(
            f"Prompt {prompt!r} is not in the shapes grammar. Captions look like 'a red circle', 'two blue squares', "
            "'a green triangle above a cyan circle' or 'a red circle moving left'; colours "
            f"{sorted(COLOURS)}, shapes {list(SHAPES)}, counts one-four (see visalign.shapes.grammar.TEMPLATES).")
    if len(found) > 1:  # the grammar is meant to be unambiguous; this guards edits to TEMPLATES
        raise ValueError(f"Prompt {prompt!r} parses ambiguously as {sorted(map(str, found))}.")
    spec = found.pop()
    if len(_PARSE_CACHE) < 100_000:  # training loops re-grade the same few thousand prompts
        _PARSE_CACHE[prompt] = spec
    return spec


def vocabulary() -> list[str]:
    """Every word any caption can contain, sorted (for word-level tokenizers)."""
    words: set[str] = set()
    for t in ALL_TEMPLATES:
        words.update(w for w in _SLOT_RE.sub(" ", t.text).split())
    words.update(COLOURS)
    words.update(SHAPES)
    words.update(PLURALS.values())
    words.update(NUMBER_WORDS.values())
    for ws in (*RELATION_WORDS.values(), *DIRECTION_WORDS.values()):
        for w in ws:
            words.update(w.split())
    return sorted(words)
