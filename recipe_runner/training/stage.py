"""The training stage: prepare once, train (here or in N launched processes), save, sample, describe.

prepare_training  -> base model resolved/built (before any worker starts; the precompute is the session's)
train_controlnet  -> session -> resume? -> loop -> controlnet/ + final grid + README.md -> results
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from recipe_runner.errors import RunFailed, UserError
from recipe_runner.families.loading import load_components, resolve_base
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.runfolder.atomic import atomic_dir
from recipe_runner.runfolder.layout import RunFolder
from recipe_runner.runfolder.log import peak_host_memory_mb
from recipe_runner.training import checkpoints, features, model_card
from recipe_runner.training.data import load_rows
from recipe_runner.training.distributed import announce, launched_rank
from recipe_runner.training.ema import averaged
from recipe_runner.training.keys import resume_fields, saved_processes
from recipe_runner.training.launch import launch_workers, write_launch_spec
from recipe_runner.training.loop import LoopState, save_checkpoint, steady_rate, train_loop, validate
from recipe_runner.training.lora import is_lora, plain_copy, save_adapter
from recipe_runner.training.precompute import EncodedCache
from recipe_runner.training.progress import print_summary
from recipe_runner.training.session import (
    Session,
    cache_folder,
    ensure_cache,
    open_session,
    peak_accelerator_memory_mb,
    tracker_config,
    training_paths,
)


def _quiet_libraries() -> None:
    # transformers/diffusers draw their own bars for every from_pretrained; ours says what matters.
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


@dataclass
class PreparedTraining:
    base: str  # from_pretrained-able: a folder path or a hub id
    cache: Path | None  # the precompute cache folder, when train.precompute


def prepare_training(
    loaded: LoadedRecipe, folder: RunFolder, console: Console | None = None, *, precompute: bool = True
) -> PreparedTraining:
    """What must happen once before (possibly several) training processes start: check the machine,
    resolve (or build) the base model, and (`precompute=True`: benchmarks, which time training alone)
    write the precompute cache. Training passes False and leaves the cache to the session: one process
    loads the encoders once for both; several share the encoding (training/precompute.py, Shard)."""
    _quiet_libraries()
    recipe = loaded.recipe
    features.check_environment(recipe)
    base = resolve_base(loaded, folder.models_cache)
    if not (recipe.precomputes and precompute):
        return PreparedTraining(base, None)
    data = load_rows(folder.dataset_data, recipe)
    dtype = features.weight_dtype(recipe)
    path = cache_folder(loaded, folder, base, dtype)
    cached = EncodedCache.open(path)
    if cached is not None and cached.holds(len(data["train"])):
        return PreparedTraining(base, path)  # nothing to load: the cache is there, every row encoded
    c = load_components(loaded, base, unet=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = ensure_cache(loaded, folder, c, base, data["train"], device, dtype, console)
    return PreparedTraining(base, cache.folder)


def train_controlnet(
    loaded: LoadedRecipe, folder: RunFolder, *, resume: bool = False, console: Console | None = None
) -> dict:
    """Train the recipe's ControlNet into `folder`. The one place that decides where training runs:

    - launch.num_processes (x num_machines) > 1: in that many processes this one launches and waits for;
    - rank 0 of the user's own `accelerate launch`: prepare once, tell the waiting ranks to join
      (they come through training.distributed.follow), and train with them;
    - otherwise here, in this process.

    Raises UserError (bad inputs), RunFailed (e.g. non-finite loss) or Interrupted (SIGINT/SIGTERM, after
    writing a checkpoint). Returns the results summary (also printed when a console is given)."""
    rank = launched_rank()
    if rank:  # a worker of a launch: rank 0 has prepared
        return run_training(loaded, folder, resume=resume, console=console)
    several = rank == 0 or loaded.recipe.launch.total_processes > 1
    # Once, before any worker starts. The precompute is the session's: in one process it loads the
    # models once for both; in several, each encodes its share of the rows on its own device.
    prepared = prepare_training(loaded, folder, console=console, precompute=False)
    if rank is None and several:
        return launch_workers(loaded, folder, prepared.base, resume=resume, console=console)
    if rank == 0:
        write_launch_spec(loaded, folder, prepared.base, log=False, terminal=False)
        announce(folder, train=True)
    return run_training(loaded, folder, resume=resume, console=console, base=prepared.base)


def run_training(
    loaded: LoadedRecipe,
    folder: RunFolder,
    *,
    resume: bool = False,
    console: Console | None = None,
    base: str | None = None,
    profile: bool = False,
    stop_file: Path | None = None,
) -> dict:
    """Train in this process (one of several when launched). `profile` times each phase (benchmark);
    `stop_file` appearing stops training like a first Ctrl-C (the launching process's way to ask)."""
    _quiet_libraries()
    wall = time.perf_counter()
    session = open_session(loaded, folder, console, base=base)
    accelerator = session.accelerator
    state = _start(session, resume)
    start_step, start_seconds = state.global_step, state.seconds
    if accelerator.is_main_process:
        controlnet = loaded.recipe.model.controlnet
        fresh = f"fine-tuning {controlnet}" if controlnet else "from scratch"
        origin = f"from step {start_step}" if start_step else fresh
        session.say(
            f"training {session.max_steps} steps ({origin}),"
            f" batch {session.recipe.train.batch_size} x {session.recipe.train.gradient_accumulation_steps} "
            f"accumulated x {accelerator.num_processes} process(es), on {session.device}"
            f"{_threads(session.device)}"
            f"{', latents and text precomputed' if session.cache is not None else ''}"
        )
    project = loaded.recipe.logging.project or loaded.recipe.name
    accelerator.init_trackers(project, config=tracker_config(loaded))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        state = train_loop(session, state, profile=profile, stop_file=stop_file)
        if state.global_step > 0 and state.skipped_steps >= state.global_step:
            raise RunFailed(
                f"every one of the {state.global_step} optimizer steps had a non-finite loss and was skipped "
                "(train.nonfinite_loss: skip): the ControlNet learned nothing, so no weights are written. "
                "Lower train.learning_rate, use bf16 instead of fp16, or check the data",
                log=str(folder.log),
            )
        if state.global_step % loaded.recipe.train.checkpoint_every != 0 and state.global_step > start_step:
            save_checkpoint(session, state)  # the end is always resumable (e.g. to train longer)
        validate(session, state)
        _save_controlnet(session)
        results = _results(session, state, start_step, start_seconds, time.perf_counter() - wall)
        if accelerator.is_main_process:
            model_card.write(loaded, folder, results)
        accelerator.wait_for_everyone()
    finally:
        for tracker in accelerator.trackers:  # flush event files also when stopped or failed
            tracker.finish()
    print_summary(session.console, results)
    return results


def _threads(device: torch.device) -> str:
    """On a CPU, how many threads each process computes with (train.threads)."""
    if device.type != "cpu":
        return ""
    n = torch.get_num_threads()
    return f" ({n} thread{'s' if n != 1 else ''} each)"


def _start(session: Session, resume: bool) -> LoopState:
    folder, accelerator = session.folder, session.accelerator
    say = session.say if accelerator.is_main_process else (lambda _message: None)
    if resume:
        saved = checkpoints.resume(accelerator, folder, resume_fields(session.recipe), say)
        if saved is not None:
            state = LoopState.from_checkpoint(saved)
            if session.stream is not None:
                _restore_stream(session, saved)
            before = saved_processes(saved["resume_fields"])
            if before is not None and before != accelerator.num_processes:
                checkpoints.realign_schedule(
                    session.lr_scheduler, session.optimizer, state.global_step * accelerator.num_processes
                )
                rows = session.recipe.train.batch_size * accelerator.num_processes
                say(
                    f"the checkpoint was made by {before} process(es), this run has "
                    f"{accelerator.num_processes}: the same {rows} rows per micro-step, so training "
                    "continues as it would have"
                )
            return state
    elif accelerator.is_main_process:
        checkpoints.clear_for_fresh_start(folder, say)
    accelerator.wait_for_everyone()
    return LoopState()


def _restore_stream(session: Session, saved: dict) -> None:
    """Each process continues its share of a streaming source at the row after the checkpoint's."""
    positions, processes = saved.get("stream"), session.accelerator.num_processes
    if not positions:
        raise UserError(
            f"checkpoint {saved.get('path')} holds no stream position (made before the source streamed)",
            hint="run without --resume to start over",
        )
    if len(positions) != processes:
        raise UserError(
            f"checkpoint {saved.get('path')} was made by {len(positions)} process(es), each reading its own "
            f"share of the stream, and this run has {processes}: the shares would differ",
            hint=f"resume with launch.num_processes: {len(positions)}, or run without --resume to start over",
        )
    session.stream.restore(positions[session.accelerator.process_index])


def _stream_summary(session: Session) -> dict | None:
    if session.stream is None:
        return None
    return {k: v for k, v in session.stream.position().items() if k != "state_dict"}


def _save_controlnet(session: Session) -> None:
    accelerator = session.accelerator
    if accelerator.is_main_process:
        controlnet = accelerator.unwrap_model(session.controlnet)
        with averaged(session.ema, controlnet), atomic_dir(session.folder.controlnet) as tmp:
            (plain_copy(controlnet) if is_lora(controlnet) else controlnet).save_pretrained(
                tmp, safe_serialization=True
            )
        if is_lora(controlnet):  # the adapter itself, for `recipe export --format adapter/control-lora`
            with averaged(session.ema, controlnet), atomic_dir(session.folder.adapter) as tmp:
                save_adapter(controlnet, tmp)
        else:  # an earlier LoRA run's adapter in this folder is not these weights'
            shutil.rmtree(session.folder.adapter, ignore_errors=True)
    accelerator.wait_for_everyone()


def _results(session: Session, state: LoopState, start_step: int, start_seconds: float, wall: float) -> dict:
    train = session.recipe.train
    images_per_step = train.batch_size * train.gradient_accumulation_steps * session.accelerator.num_processes
    steps = state.global_step - start_step
    seconds = state.seconds - start_seconds  # state.seconds counts the runs this one resumed too
    rate = steady_rate(state) or (steps / seconds if seconds > 0 else 0.0)
    return {
        "steps": state.global_step,
        "steps_this_run": steps,
        "resumed_from": start_step or None,
        "seconds": round(state.seconds, 3),
        "seconds_this_run": round(seconds, 3),
        "wall_seconds": round(wall, 3),
        "steps_per_second": rate,
        "images_per_second": rate * images_per_step,
        "final_loss": state.last_loss,
        "skipped_steps": state.skipped_steps,
        "losses": state.losses,
        "evaluations": state.evaluations,
        "phase_seconds": state.phases,  # steps after warm-up, when profiling
        "steady_steps": state.steady_steps,
        "learning_rate": session.learning_rate,
        "images_per_step": images_per_step,
        "processes": session.accelerator.num_processes,
        "peak_memory_host_mb": peak_host_memory_mb(),
        "peak_memory_accelerator_mb": peak_accelerator_memory_mb(),
        "device": str(session.device),
        "precomputed": session.cache is not None,
        # A streaming source: where this process is in it (epoch, rows read in it, rows dropped so far).
        "stream": _stream_summary(session),
        "precompute_seconds": session.precompute_seconds,  # 0.0-ish when the cache was already there
        # Fewer than the train rows after a run shorter than an epoch (training/precompute.py).
        "precomputed_rows": session.cache.rows_with_latents if session.cache is not None else None,
        "sample_grid": state.last_sample,
        "last_checkpoint": state.last_checkpoint,
        "paths": training_paths(session.folder),
    }
