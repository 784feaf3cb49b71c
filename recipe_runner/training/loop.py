"""The step loop: micro-batches in plan order, accumulation, clipping, checkpoints, validation, stop.

Position in training is one number, the micro-step: epoch and batch follow from it and the plan, and
optimizer step = micro-step / gradient_accumulation_steps. A checkpoint stores both, so resuming never
double-counts accumulated steps (diffusers issue #3467).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from recipe_runner.errors import Interrupted, RunFailed
from recipe_runner.training import checkpoints, validation
from recipe_runner.training.data import RowSource, loader_workers, micro_batches, stream_batches
from recipe_runner.training.ema import averaged
from recipe_runner.training.keys import resume_fields
from recipe_runner.training.lora import trainable
from recipe_runner.training.progress import StopRequest, TrainingProgress
from recipe_runner.training.session import Session
from recipe_runner.training.step import controlnet_loss, draw, inputs_by_encoding, inputs_from_cache

WARMUP_STEPS = 2  # optimizer steps left out of the steady-state speed (allocator, autotuning, compile)


# What a checkpoint keeps of the loop's state (the rest is this run's bookkeeping).
_RESUMED = ("global_step", "micro_step", "skipped_steps", "last_loss", "seconds", "losses", "evaluations")


@dataclass
class LoopState:
    global_step: int = 0
    micro_step: int = 0
    skipped_steps: int = 0
    last_loss: float | None = None
    seconds: float = 0.0  # time in steps over all runs (checkpoints and validation excluded)
    steady_steps: int = 0  # this run's steps after warm-up, and their time
    steady_seconds: float = 0.0
    last_checkpoint: str | None = None
    last_sample: str | None = None
    losses: list[list[float]] = field(default_factory=list)  # [step, loss] at each logging point
    evaluations: list[list] = field(default_factory=list)  # [step, {metric: value}] (evaluate.at_validation)
    phases: dict[str, float] = field(default_factory=dict)  # filled when profiling

    def for_checkpoint(self, session: Session) -> dict:
        state = {k: v for k, v in asdict(self).items() if k in _RESUMED}
        if session.stream is not None:  # every process's place in its share of the stream
            from accelerate.utils import gather_object

            positions = gather_object([session.stream.position()])
            state["stream"] = positions
            state["epoch"] = positions[0]["epoch"]
        else:
            state["epoch"] = self.micro_step // session.plan.batches_per_epoch
        state["recipe_hash"] = session.recipe.content_hash()
        state["resume_fields"] = resume_fields(session.recipe)
        return state

    @classmethod
    def from_checkpoint(cls, state: dict) -> LoopState:
        return cls(**{k: state[k] for k in _RESUMED if k in state}, last_checkpoint=state.get("path"))


class PhaseTimer:
    """Seconds per phase (data, encode, forward, backward, optimizer) of the steps after warm-up; it
    synchronises CUDA, so it is only on when asked for (the benchmark)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.warm = False
        self.totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not (self.enabled and self.warm):
            yield
            return
        sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
        sync()
        start = time.perf_counter()
        yield
        sync()
        self.totals[name] += time.perf_counter() - start


def save_checkpoint(session: Session, state: LoopState) -> None:
    path = checkpoints.save_checkpoint(session.accelerator, session.folder, state.for_checkpoint(session))
    state.last_checkpoint = str(path)
    if session.accelerator.is_main_process:
        checkpoints.prune(session.folder, session.recipe.train.checkpoints_total_limit, session.say)


def validate(session: Session, state: LoopState) -> None:
    """Sample grid at this step, on the main process only (the others wait)."""
    accelerator = session.accelerator
    if accelerator.is_main_process:
        controlnet = accelerator.unwrap_model(session.controlnet)
        controlnet.eval()
        try:
            # With train.ema_decay, the grids (and evaluate.at_validation) show the averaged weights.
            with averaged(session.ema, controlnet), session.encoders_on_device():
                conds = validation.validation_pairs(session.loaded, session.data)
                images = validation.generate(
                    session.loaded,
                    session.components,
                    controlnet,
                    conds,
                    session.device,
                    session.weight_dtype,
                )
                if validation.evaluates_at_validation(session.loaded, session.data):
                    _evaluate(session, state, controlnet)  # with the same models in place
        finally:
            controlnet.train()
        grid = validation.make_grid(conds, images, session.recipe.dataset.resolution)
        path = validation.save_grid(grid, session.folder.samples / f"step-{state.global_step}.png")
        validation.log_grid(accelerator, grid, state.global_step)
        state.last_sample = str(path)
    accelerator.wait_for_everyone()


def _evaluate(session: Session, state: LoopState, controlnet: torch.nn.Module) -> None:
    """Condition fidelity now, as `evaluate/<metric>` at this step: the final evaluate stage's curve.
    Called by `validate` with the ControlNet in eval mode and the encoders on the device."""
    if session.eval_condition is None:
        from recipe_runner.conditions import build_condition

        session.eval_condition = build_condition(session.recipe.condition, base_dir=session.loaded.base_dir)
        session.eval_condition.setup(session.device.type)
    scores = validation.evaluate_now(
        session.loaded,
        session.components,
        controlnet,
        session.eval_condition,
        session.data,
        session.device,
        session.weight_dtype,
    )
    values = {k: v for k, v in scores.items() if v is not None and math.isfinite(v)}
    session.accelerator.log({f"evaluate/{k}": v for k, v in values.items()}, step=state.global_step)
    state.evaluations.append([state.global_step, values])
    shown = ", ".join(f"{k} {v:.3f}" for k, v in values.items())
    session.say(f"[dim]step {state.global_step}: condition fidelity {shown}[/]")


def _micro_batches(session: Session, state: LoopState, total_micro: int) -> Iterator[tuple[dict, list[int]]]:
    recipe = session.recipe
    if session.stream is not None:
        rows = iter(session.stream)
        rank = session.accelerator.process_index
        res, channels = recipe.dataset.resolution, recipe.model.conditioning_channels
        return stream_batches(rows, recipe.train.batch_size, rank, res, channels)
    assert session.plan is not None
    source = RowSource(
        session.data["train"],
        None if recipe.dataset.buckets.enabled else recipe.dataset.resolution,
        recipe.model.conditioning_channels,
        precomputed=session.cache is not None,
    )
    workers = loader_workers(recipe.train.dataloader_num_workers, session.device)
    return micro_batches(source, session.plan, state.micro_step, total_micro, workers, session.device)


def _nonfinite(session: Session, state: LoopState, value: float) -> None:
    step = state.global_step + 1
    where = state.last_checkpoint or "none yet (nothing to resume from)"
    raise RunFailed(
        f"the loss became {value} at optimizer step {step} (micro-step {state.micro_step}); "
        f"last good checkpoint: {where}. Lower train.learning_rate, use bf16 instead of fp16, or set "
        "train.nonfinite_loss: skip",
        log=str(session.folder.log),
    )


def _update(
    session: Session, state: LoopState, group_loss: torch.Tensor, stop: StopRequest
) -> tuple[float, bool]:
    """End of an accumulation group: agree on the loss and on stopping across processes (one collective
    per optimizer step), then clip and step, or handle a non-finite loss."""
    accelerator, train = session.accelerator, session.recipe.train
    stop_flag = torch.tensor(float(stop.requested), device=group_loss.device)
    flags = torch.stack([group_loss / train.gradient_accumulation_steps, stop_flag])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "mean")
    mean_loss, stop_now = flags[0].item(), flags[1].item() > 0
    group_loss.zero_()
    if math.isfinite(mean_loss):
        if train.max_grad_norm is not None:
            accelerator.clip_grad_norm_(session.controlnet.parameters(), train.max_grad_norm)
        session.optimizer.step()
    elif train.nonfinite_loss == "stop":
        _nonfinite(session, state, mean_loss)
    else:
        state.skipped_steps += 1
        session.optimizer.zero_grad(set_to_none=True)  # drop the non-finite gradients
    session.lr_scheduler.step()
    session.optimizer.zero_grad(set_to_none=train.set_grads_to_none)
    if session.ema is not None and math.isfinite(mean_loss):
        # After the gradients are freed: an offloaded average visits the accelerator in their place.
        session.ema.step(trainable(session.controlnet))
    return mean_loss, stop_now


def _after_update(session: Session, state: LoopState, mean_loss: float, bar: TrainingProgress) -> bool:
    """Progress, logs, checkpoint and validation of the step just taken; True if it checkpointed."""
    step, train = state.global_step, session.recipe.train
    state.last_loss = mean_loss if math.isfinite(mean_loss) else state.last_loss
    lr = session.lr_scheduler.get_last_lr()[0]
    bar.update(step, mean_loss, lr)
    if step % session.recipe.logging.every == 0 or step == session.max_steps:
        session.accelerator.log({"train/loss": mean_loss, "train/lr": lr}, step=step)
        state.losses.append([step, mean_loss])
    due = step % train.checkpoint_every == 0
    if due:
        save_checkpoint(session, state)
    if step % train.validation.every == 0 and step < session.max_steps:
        validate(session, state)  # the final grid is made after the loop
    return due


def train_loop(
    session: Session, state: LoopState, *, profile: bool = False, stop_file: Path | None = None
) -> LoopState:
    recipe, train, accelerator = session.recipe, session.recipe.train, session.accelerator
    c, device, dtype = session.components, session.device, session.weight_dtype
    accelerator.step = state.micro_step  # accelerate's accumulation counter (not reset at epoch ends)
    timesteps = c.noise_scheduler.config.num_train_timesteps
    sample_timestep = c.family.timestep_sampler(recipe, timesteps)
    total_micro = session.max_steps * train.gradient_accumulation_steps
    timer = PhaseTimer(profile)
    group_loss = torch.zeros((), device=device)  # summed on the device: no sync per micro-step
    started_at = state.global_step
    batches = _micro_batches(session, state, total_micro)
    with (
        StopRequest(session.console, stop_file) as stop,
        TrainingProgress(session.console, session.max_steps, started_at) as bar,
    ):
        while state.micro_step < total_micro:
            # This micro-step belongs to optimizer step global_step + 1.
            warm = timer.warm = state.global_step + 1 - started_at > WARMUP_STEPS
            tick = time.perf_counter()
            with timer("data"):
                batch, positions = next(batches)
                draws = draw(
                    recipe.seed,
                    state.micro_step,
                    positions,
                    c.latent_shape(*batch["conditioning"].shape[-2:]),  # this batch's bucket
                    timesteps,
                    train.empty_prompt_ratio,
                    offset=train.noise_offset > 0,
                    sample_timestep=sample_timestep,
                )
            with accelerator.accumulate(session.controlnet):
                with timer("encode"):
                    if session.cache is not None:
                        inputs = inputs_from_cache(session.cache, batch, draws, device, dtype)
                    else:
                        inputs = inputs_by_encoding(c, batch, draws, device, dtype)
                with timer("forward"):
                    loss = controlnet_loss(c, session.controlnet, inputs, draws, recipe, dtype)
                with timer("backward"):
                    accelerator.backward(loss)
                group_loss += loss.detach().float()
                synced = accelerator.sync_gradients
                if synced:
                    with timer("optimizer"):
                        mean_loss, stop_now = _update(session, state, group_loss, stop)
            state.micro_step += 1
            elapsed = time.perf_counter() - tick
            state.seconds += elapsed
            state.steady_seconds += elapsed if warm else 0.0
            if not synced:
                continue
            state.global_step += 1
            state.steady_steps += int(warm)
            checkpointed = _after_update(session, state, mean_loss, bar)
            if stop_now:
                if not checkpointed:
                    save_checkpoint(session, state)
                raise Interrupted(
                    f"training stopped at step {state.global_step}; checkpoint written to "
                    f"{state.last_checkpoint}. Continue with the same command plus --resume"
                )
    state.phases = dict(timer.totals)
    return state


def steady_rate(state: LoopState) -> float | None:
    return state.steady_steps / state.steady_seconds if state.steady_seconds > 0 else None
