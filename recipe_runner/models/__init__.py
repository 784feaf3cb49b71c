"""Models recipe-runner can build itself: the builtin tiny SD/SDXL models and their tokenizer.

Import the submodules directly; `tiny` pulls in torch/diffusers and is meant for training code only.
"""
