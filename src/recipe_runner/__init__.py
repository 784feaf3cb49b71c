"""recipe-runner: train ControlNets for Stable Diffusion from one declarative YAML recipe."""

__version__ = "0.1.0"
