"""The seams between the stages, each defined once (docs/architecture.md "Layering").

* :mod:`omnidiff.contracts.snapshot`: the pair snapshot (collect writes it; embed and train read it);
* :mod:`omnidiff.contracts.cache` (+ ``cache_verify``): the embedding cache's format, reader and folders
  (embed writes it; train reads it);
* :mod:`omnidiff.contracts.encoders`: what identifies an LLM / CLIP / pixel encoder (the fingerprint
  inputs), computed from paths and plain settings without loading any weights;
* :mod:`omnidiff.contracts.keys`: text keys, the English-side rule, the empty prompt;
* :mod:`omnidiff.contracts.io`: hashing, atomic writes and file locks the contracts share.

A stage imports another stage's data only through here: ``data_prep``, ``embed_cache``, ``train`` and
``serve`` never import each other (import-linter contracts in pyproject.toml, checked by
tests/test_layering.py).
"""
