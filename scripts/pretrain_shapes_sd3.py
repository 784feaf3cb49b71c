"""Pretrain the tiny `shapes-sd3` base: an SD3-shaped flow-matching model for the builtin shapes data.

The flow-matching counterpart of scripts/pretrain_shapes_base.py (`shapes-sd`): a ControlNet trained on a
random SD3 base for a few CPU minutes shows nothing, so this makes a small base that already draws the
prompt's colours and a rough shape. It reuses the shipped shapes-sd VAE (frozen: 4 latent channels, 4x
downsampling, latents already centred and whitened, so shift 0 and scale 1) and trains two CLIP text
encoders with projections (SD3's CLIP-L and CLIP-G roles; no T5, as SD3 runs without one) together with
an MMDiT `SD3Transformer2DModel` from scratch:

    .venv/bin/python scripts/pretrain_shapes_sd3.py --out /tmp/shapes-sd3   # about 40 min on 2 cores
    .venv/bin/python scripts/pretrain_shapes_sd3.py --check /tmp/shapes-sd3 # grid + colour score
    .venv/bin/python scripts/pretrain_shapes_sd3.py --ship /tmp/shapes-sd3  # fp16 into the package

Training is rectified flow as SD3's: z_t = (1 - sigma) x + sigma noise, the transformer predicts
noise - x at timestep 1000 sigma, sigma drawn logit-normal (0, 1); 10% empty prompts for classifier-free
guidance; an EMA of the weights. The prompt encoding is the SD3 pipeline's, without T5: both CLIPs'
penultimate hidden states side by side, then as many zero tokens (where T5's would be) of the same
width, and both pooled projections. See docs/shapes-base.md for the shipped run's figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

# scripts/ is not a package; the shapes-sd script's helpers (data pool, check) are imported from it, and it
# sets OMP_WAIT_POLICY, which must happen before torch is imported.
sys.path.insert(0, str(Path(__file__).parent))
import pretrain_shapes_base as common
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from recipe_runner.models.shapes_base import shapes_base_path, shapes_base_settings
from recipe_runner.models.tokenizer import write_tiny_clip_tokenizer

# The prompts are about 10 tokens; 16 CLIP tokens are plenty.
TOKENS = 16
# Without T5, StableDiffusion3Pipeline puts `max_sequence_length` zero tokens where T5's would be;
# recipe-runner trains and samples SD3 with 77 (train_controlnet_sd3.py's --max_sequence_length), so the
# base must have learned with as many. They cost speed: 16 + 77 text tokens beside 64 image tokens.
ZERO_TOKENS = 77
TEXT_WIDTH = common.TEXT_WIDTH  # each CLIP's (64); side by side, the transformer's 128-wide context
LAYERS, HEADS, HEAD_DIM = 6, 4, 32
SHIFT = 1.0  # the scheduler's sigma shift: SD3 uses 3 at 1024 px; 64 px images need none


def build_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=common.RESOLUTION // common.VAE_DOWNSAMPLE,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=LAYERS,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=2 * TEXT_WIDTH,
        caption_projection_dim=HEADS * HEAD_DIM,
        pooled_projection_dim=2 * TEXT_WIDTH,
        pos_embed_max_size=32,  # up to 256 px at this VAE's 4x
        qk_norm="rms_norm",  # SD 3.5's: steadier attention logits at a high learning rate
    )


def load_vae() -> AutoencoderKL:
    """The shipped shapes-sd VAE, in fp32, with shift_factor 0 (the SD3 pipeline adds it when decoding)."""
    vae = AutoencoderKL.from_pretrained(shapes_base_path(), subfolder="vae", torch_dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def encode_text(encoders, ids: list[torch.Tensor], zeros: int) -> tuple[torch.Tensor, torch.Tensor]:
    """StableDiffusion3Pipeline.encode_prompt without T5, with max_sequence_length `zeros`: (tokens,
    pooled)."""
    hidden, pooled = [], []
    for encoder, tokens in zip(encoders, ids, strict=True):
        out = encoder(tokens, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = torch.cat(hidden, dim=-1)
    t5 = clip.new_zeros(clip.shape[0], zeros, clip.shape[-1])
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


def lr_at(step: int, steps: int, peak: float, warmup: int = 200) -> float:
    return common.lr_at(step, steps, peak, warmup=warmup)


def train(
    transformer: SD3Transformer2DModel,
    encoders: list[CLIPTextModelWithProjection],
    latents: tuple[torch.Tensor, torch.Tensor],
    ids: list[torch.Tensor],
    empty_ids: list[torch.Tensor],
    args: argparse.Namespace,
    on_checkpoint,
) -> list[dict]:
    """Rectified-flow training; returns the EMA weights of the transformer and both encoders."""
    models = [transformer.train(), *(e.train() for e in encoders)]
    params = [p for m in models for p in m.parameters()]
    ema = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(2)
    mean, std = latents
    steps, batch = args.steps, args.batch
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr)
        idx = torch.randint(len(mean), (batch,), generator=gen)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        drop = torch.rand(batch, generator=gen) < 0.1  # 10% unconditional
        tokens = []
        for all_ids, empty in zip(ids, empty_ids, strict=True):
            t = all_ids[idx].clone()
            t[drop] = empty
            tokens.append(t)
        noise = torch.randn(x0.shape, generator=gen)
        u = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal (0, 1)
        sigma = SHIFT * u / (1 + (SHIFT - 1) * u)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        text, pooled = encode_text(encoders, tokens, args.zero_tokens)
        pred = transformer(noisy, text, pooled, sigma * 1000, return_dict=False)[0]
        loss = ((pred - (noise - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        common.update_ema(models, ema, step)
        if step % 200 == 0 or step == steps - 1:
            common.log(f"step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
        if (step + 1) % args.every == 0 and step + 1 < steps:
            on_checkpoint(step + 1, ema)
    return ema


def save_pipeline(out: Path, vae, encoders, tokenizers, transformer, info: dict) -> None:
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.cpu(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
        vae=vae,
        text_encoder=encoders[0].cpu(),
        tokenizer=tokenizers[0],
        text_encoder_2=encoders[1].cpu(),
        tokenizer_2=tokenizers[1],
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    _plain_tokenizers(out)
    (out / "recipe_runner.json").write_text(json.dumps(info, indent=2) + "\n")


def _plain_tokenizers(out: Path) -> None:
    # transformers 5 saves load-time kwargs into tokenizer_config.json; rewrite our four plain files.
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(out / name)
        write_tiny_clip_tokenizer(out / name, model_max_length=TOKENS)


def pretrain(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    out = Path(args.out)
    timings: dict[str, float] = {}
    t0 = time.time()
    images, prompts = common.make_pool(args.pool, common.DATA_SEED)
    timings["data_s"] = time.time() - t0
    common.log(f"pool of {len(images)} rows in {timings['data_s']:.0f}s")
    vae = load_vae()
    t0 = time.time()
    latents = common.encode_pool(vae, images, "cpu")
    timings["encode_s"] = time.time() - t0

    tokenizers, ids, empty_ids = [], [], []
    for name in ("tokenizer", "tokenizer_2"):
        write_tiny_clip_tokenizer(out / name, model_max_length=TOKENS)
        tokenizer = CLIPTokenizer.from_pretrained(out / name)
        tok = {"padding": "max_length", "max_length": TOKENS, "truncation": True, "return_tensors": "pt"}
        tokenizers.append(tokenizer)
        ids.append(tokenizer(prompts, **tok).input_ids)
        empty_ids.append(tokenizer([""], **tok).input_ids[0])
    longest = int((ids[0] != tokenizers[0].pad_token_id).sum(dim=1).max())
    common.log(f"longest prompt: {longest} of {TOKENS} tokens")
    if args.init:  # go on from an earlier run's weights (the shipped base was made in two runs)
        pipe = load_pipeline(args.init)
        encoders, transformer = [pipe.text_encoder, pipe.text_encoder_2], pipe.transformer
    else:
        encoders = []
        for offset, tokenizer in enumerate(tokenizers):
            torch.manual_seed(args.seed + offset)  # the two encoders start apart
            encoders.append(common.build_text_encoder(tokenizer, CLIPTextModelWithProjection))
        torch.manual_seed(args.seed)
        transformer = build_transformer()

    def checkpoint(step: int, ema: list[dict]) -> None:
        # The EMA weights so far, as a loadable folder, to look at while training goes on.
        models = [copy.deepcopy(m).cpu() for m in (transformer, *encoders)]
        for m, state in zip(models, ema, strict=True):
            m.load_state_dict(state)
        save_pipeline(out / "partial", vae, models[1:], tokenizers, models[0], {"step": step})

    t0 = time.time()
    ema = train(transformer, encoders, latents, ids, empty_ids, args, checkpoint)
    for m, state in zip((transformer, *encoders), ema, strict=True):
        m.load_state_dict(state)
    timings["train_s"] = time.time() - t0
    common.log(f"text encoders + transformer trained in {timings['train_s']:.0f}s")
    count = {
        "transformer": sum(p.numel() for p in transformer.parameters()),
        "text_encoders": sum(p.numel() for e in encoders for p in e.parameters()),
        "vae (shapes-sd's)": sum(p.numel() for p in vae.parameters()),
    }
    info = {
        "vae_downsample": common.VAE_DOWNSAMPLE,
        "resolution": common.RESOLUTION,
        "pretraining": {
            "command": " ".join(["scripts/pretrain_shapes_sd3.py", *args.argv]),
            "seed": args.seed,
            "data_seed": common.DATA_SEED,
            "zero_tokens": args.zero_tokens,
            "init": str(args.init) if args.init else None,
            "init_pretraining": shapes_base_settings(args.init).get("pretraining") if args.init else None,
            "parameters": count,
            "timings_s": {k: round(v) for k, v in timings.items()},
        },
    }
    save_pipeline(out, vae, encoders, tokenizers, transformer, info)
    common.log(f"saved to {out}: {count}, timings {info['pretraining']['timings_s']}")


def load_pipeline(folder: Path) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(
        folder, text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32
    )


def ship(folder: Path, dest: Path) -> None:
    """Copy a pretrained folder into the package, the transformer and VAE in fp16 (diffusers loads them
    back as fp32); the text encoders stay fp32 (transformers 5 would load them in fp16)."""
    pipe = load_pipeline(folder)
    pipe.transformer.half()
    pipe.vae.half()
    if dest.exists():
        shutil.rmtree(dest)
    pipe.save_pretrained(dest, safe_serialization=True)
    _plain_tokenizers(dest)
    common.finish_ship(folder, dest)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="folder to write the pretrained pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weight initialisation")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--zero-tokens", type=int, default=ZERO_TOKENS, help="where T5's tokens would be")
    parser.add_argument("--init", type=Path, metavar="FOLDER", help="start from this run's weights")
    parser.add_argument("--every", type=int, default=1000, help="save the EMA so far to OUT/partial")
    parser.add_argument("--pool", type=int, default=32768, help="builtin shapes rows to train on")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--check", type=Path, metavar="FOLDER", help="score a pretrained folder and exit")
    parser.add_argument("--check-images", type=int, default=16, help="images --check generates")
    parser.add_argument("--ship", type=Path, metavar="FOLDER", help="copy FOLDER (fp16) to --dest")
    parser.add_argument(
        "--dest", type=Path, default=Path(__file__).parents[1] / "recipe_runner/assets/shapes-sd3"
    )
    args = parser.parse_args(argv)
    args.argv = argv
    torch.set_num_threads(args.threads)
    if args.check:
        common.check(args.check, num=args.check_images, load=load_pipeline, max_sequence_length=ZERO_TOKENS)
    elif args.ship:
        ship(args.ship, args.dest)
    elif args.out:
        pretrain(args)
        common.check(args.out, num=args.check_images, load=load_pipeline, max_sequence_length=ZERO_TOKENS)
    else:
        parser.error("give --out, --check or --ship")


if __name__ == "__main__":
    main()
