"""`train.ema_decay`: an exponential moving average of the ControlNet's weights.

diffusers' EMAModel keeps the average, its decay schedule ((1 + step) / (10 + step), capped at the
recipe's decay), its state dict for accelerate's checkpoints and the swap in and out of the model. Only
its update is ours: EMAModel's foreach path allocates `shadow - params` for every tensor at once (a
second fp32 ControlNet, 1.4 GB at SD 1.5, at each step); one in-place lerp computes the same
`shadow += (1 - decay) * (params - shadow)` without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.training_utils import EMAModel

from recipe_runner.recipe.recipe import Recipe
from recipe_runner.training.lora import trainable


class ControlNetEMA(EMAModel):
    def __init__(self, controlnet: torch.nn.Module, decay: float, offload: bool):
        super().__init__(
            trainable(controlnet), decay=decay, model_cls=type(controlnet), model_config=controlnet.config
        )
        self.offload = offload
        self.home = torch.device("cpu") if offload else next(controlnet.parameters()).device
        self.to(self.home)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.to(self.home)  # accelerate loads checkpoints onto the CPU

    @torch.no_grad()
    def step(self, parameters) -> None:
        parameters = list(parameters)
        self.optimization_step += 1
        decay = self.cur_decay_value = self.get_decay(self.optimization_step)
        if self.offload:  # as diffusers' --offload_ema: on the accelerator only for the update
            self.to(parameters[0].device, non_blocking=True)
        torch._foreach_lerp_(self.shadow_params, [p.detach() for p in parameters], 1.0 - decay)
        if self.offload:
            self.to(self.home, non_blocking=True)


def make_ema(recipe: Recipe, controlnet: torch.nn.Module) -> ControlNetEMA | None:
    t = recipe.train
    return None if t.ema_decay is None else ControlNetEMA(controlnet, t.ema_decay, t.ema_offload)


@contextlib.contextmanager
def averaged(ema: ControlNetEMA | None, controlnet: torch.nn.Module) -> Iterator[None]:
    """The averaged weights in `controlnet` for the block (validation, saving), the trained ones after."""
    if ema is None:
        yield
        return
    params = trainable(controlnet)  # what the average covers (a LoRA's frozen weights do not move)
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)
