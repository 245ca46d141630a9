"""The base text-to-image model ("the existing model", Stable Diffusion's part) and its evaluator.

``omnidiff base pretrain | evaluator | score`` (omnidiff/base/cli.py); see
pretrain.py, evaluator_train.py and omnidiff/scoring.py.
"""
