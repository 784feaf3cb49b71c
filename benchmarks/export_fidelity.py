"""How close each export of a trained SD-family run is to the run's own ControlNet, read back through
diffusers' loaders (which nobody here wrote).

    recipe run recipes/demo.yaml                       # or any finished SD 1.x/2.x/SDXL run
    python benchmarks/export_fidelity.py runs/demo --ranks 16 64 128

For each rank, `recipe export RUN --format control-lora --rank R` (truncated SVD of ControlNet - base
UNet for a full run), read back as ComfyUI applies one (the base UNet's weights, up @ down added, then
diffusers' single-file loader) and, where the base has 2 layers per block as diffusers' SAI path assumes,
through that path (`ControlNetModel.from_unet(unet)` + `load_lora_adapter`). Then `--format single-file`
at fp16 read by `ControlNetModel.from_single_file` (SD 1.x/2.x: diffusers cannot read SDXL's
`label_emb` from this layout, see docs/exports.md). Compared: the ControlNet's down-block residuals and
mid-block residual for fixed random inputs at two timesteps, as max |difference| and relative to the
outputs' max |value|. JSON to benchmarks/results/export-fidelity-DIR.json (DIR: the run folder's
name), printed too. The exports are written into RUN/export/ as `recipe export` would.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # a source checkout works too


def _inputs(controlnet, resolution: int, vae_factor: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(1)
    side = resolution // vae_factor
    return {
        "sample": torch.randn(2, controlnet.config.in_channels, side, side, generator=g),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 77, controlnet.config.cross_attention_dim, generator=g),
        "controlnet_cond": torch.rand(2, 3, resolution, resolution, generator=g),
        "return_dict": False,
    }


def _outputs(controlnet, inputs: dict) -> list:
    import torch

    with torch.no_grad():
        down, mid = controlnet.float()(**inputs)
    return [*down, mid]


def _difference(a: list, b: list) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _comfyui_style(state: dict, base: dict, layers_per_block: int, config: Path):
    """A Control-LoRA applied as ComfyUI does (comfy/controlnet.py, ControlLora.pre_run: the UNet's
    weights, each full key of the file set, up @ down added to the factored ones), on the original
    names, then read by diffusers' single-file loader."""
    import tempfile

    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from recipe_runner.export.control_lora import applied
    from recipe_runner.export.keys import SINGLE_FILE_PREFIX, original_names

    names = original_names(list(base), layers_per_block)
    rebuilt = applied(state, {names[k]: v for k, v in base.items()})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rebuilt.safetensors"
        save_file({SINGLE_FILE_PREFIX + k: v.contiguous() for k, v in rebuilt.items()}, str(path))
        return ControlNetModel.from_single_file(str(path), config=str(config), local_files_only=True)


def measure(run: Path, ranks: list[int]) -> dict:
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import load_file

    from recipe_runner.families.loading import resolve_base
    from recipe_runner.run.lockfile import load_run_recipe
    from recipe_runner.run.publish import export_folder
    from recipe_runner.runfolder.layout import RunFolder

    folder = RunFolder(run)
    loaded, lock = load_run_recipe(folder)
    recipe = loaded.recipe
    base = resolve_base(loaded, folder.models_cache)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    trained = ControlNetModel.from_pretrained(folder.controlnet)
    vae_config = json.loads((Path(base) / "vae" / "config.json").read_text())
    vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    inputs = _inputs(trained, recipe.dataset.resolution, vae_factor)
    reference = _outputs(trained, inputs)
    scale = max(x.abs().max().item() for x in reference)
    full_bytes = (folder.controlnet / "diffusion_pytorch_model.safetensors").stat().st_size
    lpb = trained.config.layers_per_block

    def from_base() -> ControlNetModel:  # a ControlNet made from the base UNet, shaped as the run's
        channels = tuple(trained.config.conditioning_embedding_out_channels)
        return ControlNetModel.from_unet(
            unet,
            conditioning_channels=trained.config.conditioning_channels,
            conditioning_embedding_out_channels=channels,
        )

    base_state = from_base().state_dict()
    rows = []
    # A train.lora run: first its adapter's own factors (rank None: exact), against the merged ControlNet.
    for rank in ([None] if recipe.train.lora else []) + ranks:
        (entry,) = export_folder(run, ["control-lora"], rank=rank, say=lambda _m: None)
        row = {
            "format": "control-lora",
            "rank": entry["rank"],
            "source": entry["source"],
            "relative_error": entry.get("relative_error"),
            "worst_layer": entry.get("worst_layer"),
            "bytes": Path(entry["path"]).stat().st_size,
        }
        rebuilt = _comfyui_style(load_file(entry["path"]), base_state, lpb, folder.controlnet)
        diff = _difference(reference, _outputs(rebuilt, inputs))
        row.update(comfyui_style_max_abs_difference=diff, comfyui_style_relative_to_outputs=diff / scale)
        if lpb == 2:  # diffusers' SAI converter assumes 2 layers per block
            controlnet = from_base()
            controlnet.load_lora_adapter(entry["path"], prefix=None)
            diff = _difference(reference, _outputs(controlnet, inputs))
            row.update(diffusers_max_abs_difference=diff, diffusers_relative_to_outputs=diff / scale)
        rows.append(row)
    if recipe.model.resolved_family != "sdxl":
        (entry,) = export_folder(run, ["single-file"], dtype="fp16", say=lambda _m: None)
        single = ControlNetModel.from_single_file(
            entry["path"], config=str(folder.controlnet), local_files_only=True
        )
        diff = _difference(reference, _outputs(single, inputs))
        rows.append(
            {
                "format": "single-file",
                "dtype": "fp16",
                "max_abs_difference": diff,
                "relative_to_outputs": diff / scale,
                "bytes": Path(entry["path"]).stat().st_size,
            }
        )
    import diffusers

    return {
        "benchmark": "export_fidelity",
        "date": dt.date.today().isoformat(),
        "diffusers_version": diffusers.__version__,
        "run": recipe.name,
        "base": recipe.model.base,
        "steps": lock.get("stages", {}).get("train", {}).get("steps"),
        "resolution": recipe.dataset.resolution,
        "output_max_abs": scale,
        "lora": recipe.train.lora.model_dump() if recipe.train.lora else None,
        "controlnet_fp32_bytes": full_bytes,
        "exports": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("run", type=Path, help="a finished run folder (SD 1.x/2.x/SDXL)")
    parser.add_argument("--ranks", type=int, nargs="*", default=[16, 64, 128], help="SVD ranks")
    parser.add_argument("--json", type=Path, default=None, help="default: results/export-fidelity-DIR.json")
    args = parser.parse_args(argv)
    report = measure(args.run, args.ranks)
    path = args.json or HERE / "results" / f"export-fidelity-{args.run.resolve().name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
