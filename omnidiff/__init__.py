"""OmniDiffusion: a frozen LLM as the text encoder of an existing text-to-image model.

The shared core: configuration, paths, text normalisation, model building
blocks, the tiny world and MLflow tracking helpers. Stage libraries live in the
top-level packages data_prep/, embed_cache/, train/, serve/; flows/ wires them.
"""

from omnidiff.env import setup_offline

setup_offline()

__version__ = "0.1.0"
