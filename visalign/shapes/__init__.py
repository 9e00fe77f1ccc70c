"""The shapes world: a synthetic text-to-image/video world small enough to train and align on a CPU.

Modules (import what you need; nothing here is imported eagerly):

- ``world``: vocabulary (6 pure colours, circle/square/triangle, counts 1-4, four relations, four motion
  directions), prompt specs, seeded scene sampling and the train / held-out composition split;
- ``grammar``: captions with paraphrases and the exact inverse, ``parse_prompt``;
- ``render``: anti-aliased numpy/PIL rendering to canonical float pixels ``[3, H, W]`` / ``[T, 3, H, W]``;
- ``oracle``: GenEval-style grading of any image or clip against its prompt, from pixels alone;
- ``oracle_scorer``, ``colour_scorer``: the oracle and a differentiable colour-fidelity reward as scorers (cards
  ``shapes-oracle``, ``shapes-oracle-video``, ``shapes-colour``);
- ``negatives``: one-attribute hard negatives and the contrast set the ``shapes-clip-*-contrast`` cards name;
- ``prompt_sets``: the shipped prompt files in ``assets/shapes/prompts`` (``prompt_file("train")`` is one's path);
- ``build``: groundwork of ``visalign shapes build`` (seeded data streams, the word-level CLIP tokenizer).
"""
