"""recipe-runner: train ControlNets for Stable Diffusion from one declarative YAML recipe."""

import logging

__version__ = "0.1.0"

# accelerate/diffusers import bitsandbytes when it is installed, and its CPU backend then warns about a
# 4-bit matmul kernel package that 8-bit AdamW never uses: silenced here, before any of our modules (or
# a benchmark script using them) can import it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
