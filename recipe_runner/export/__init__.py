"""`recipe export`: a trained run's ControlNet in the formats other tools load, into `RUN/export/`.

    diffusers     the ControlNet folder in fp16 or bf16 (safetensors), for `from_pretrained`
    single-file   one .safetensors in the original layout (AUTOMATIC1111, ComfyUI, `from_single_file`)
    control-lora  Stability's Control-LoRA (ComfyUI, AUTOMATIC1111, diffusers' `load_lora_adapter`)
    adapter       a `train.lora` run's PEFT adapter and the ControlNet's own modules

Each output's name says what it is: `<run>-<family>-<condition>-step<N>-<format>`. Torch is imported
inside the functions (the CLI checks formats before loading anything).
"""

from __future__ import annotations

from recipe_runner.export.formats import FORMATS, check_format, export_name

__all__ = ["FORMATS", "check_format", "export_name"]
