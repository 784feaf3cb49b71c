"""Pure pieces: data order, per-sample randomness, keys."""

from __future__ import annotations

import torch

from recipe_runner.recipe.loader import load_recipe
from recipe_runner.training import training_cache_key
from recipe_runner.training.data import BatchPlan
from recipe_runner.training.keys import derive_seed, resume_fields
from recipe_runner.training.step import draw


def _global_batches(rows: int, batch: int, processes: int, epoch: int = 0) -> list[list[tuple[int, int]]]:
    """(row, position) pairs of each global micro-batch, gathered over all processes."""
    plans = [BatchPlan(rows, batch, processes, rank, seed=3) for rank in range(processes)]
    out = []
    for k in range(plans[0].batches_per_epoch):
        pairs = []
        for plan in plans:
            indices, positions = plan.batch(plan.epoch_order(epoch), k)
            pairs += list(zip(indices, positions, strict=True))
        out.append(sorted(pairs, key=lambda p: p[1]))
    return out


def test_one_process_and_two_see_the_same_global_batches():
    assert _global_batches(16, 4, 1) == _global_batches(16, 2, 2) == _global_batches(16, 1, 4)


def test_every_row_once_per_epoch_and_epochs_differ():
    plan = BatchPlan(10, 3, 1, 0, seed=0)
    assert sorted(plan.epoch_order(0).tolist()) == list(range(10))
    assert plan.epoch_order(0).tolist() != plan.epoch_order(1).tolist()
    assert plan.epoch_order(1).tolist() == BatchPlan(10, 3, 1, 0, seed=0).epoch_order(1).tolist()
    assert plan.batches_per_epoch == 4  # the last batch is partial, as with drop_last=False


def test_uneven_rows_are_padded_so_every_process_gets_the_same_count():
    plans = [BatchPlan(5, 2, 2, rank, seed=0) for rank in range(2)]
    sizes = [[len(p.batch(p.epoch_order(0), k)[0]) for k in range(p.batches_per_epoch)] for p in plans]
    assert sizes[0] == sizes[1] == [2, 1]


def test_sample_noise_depends_on_step_and_position_only():
    a = draw(
        0, micro_step=5, positions=[0, 1, 2], latent_shape=(4, 8, 8), num_timesteps=1000, empty_ratio=0.5
    )
    b = draw(0, micro_step=5, positions=[2], latent_shape=(4, 8, 8), num_timesteps=1000, empty_ratio=0.5)
    assert torch.equal(a.noise[2], b.noise[0]) and torch.equal(a.latent_noise[2], b.latent_noise[0])
    assert a.timesteps[2] == b.timesteps[0] and a.empty_prompt[2] == b.empty_prompt[0]
    c = draw(0, micro_step=6, positions=[2], latent_shape=(4, 8, 8), num_timesteps=1000, empty_ratio=0.5)
    assert not torch.equal(b.noise, c.noise)
    assert ((a.timesteps >= 0) & (a.timesteps < 1000)).all()


def test_derived_seeds_are_stable():
    assert derive_seed(0, "order", 1) == derive_seed(0, "order", 1) != derive_seed(0, "order", 2)
    assert derive_seed(0, "order", 1) == 5690028376596475920  # never Python's salted hash()


RECIPE = """\
name: keys
dataset: {source: {builtin: shapes}, resolution: 64}
model: {base: builtin:tiny-sd}
"""


def _key(tmp_path, *overrides: str, fingerprint: str = "data-1") -> str:
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return training_cache_key(load_recipe(path, list(overrides)), fingerprint)


def test_cache_key_follows_training_inputs_only(tmp_path):
    key = _key(tmp_path)
    assert key == _key(tmp_path)
    assert key != _key(tmp_path, "train.learning_rate=2e-5")
    assert key != _key(tmp_path, "seed=1")
    assert key != _key(tmp_path, fingerprint="data-2")
    assert key != _key(tmp_path, "train.validation.every=10")  # the samples are outputs too
    assert key == _key(tmp_path, "logging.every=1")
    assert key == _key(tmp_path, "train.checkpoint_every=7")


def test_resume_fields_allow_training_longer(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    a = resume_fields(load_recipe(path).recipe)
    assert a == resume_fields(load_recipe(path, ["train.max_steps=20000", "train.checkpoint_every=3"]).recipe)
    assert a != resume_fields(load_recipe(path, ["train.batch_size=8"]).recipe)


def test_fields_added_later_leave_older_checkpoints_resumable(tmp_path):
    """A checkpoint written before `train.fp8_base` existed records no such field: at its default the
    field is left out, so that checkpoint still resumes (and a finished run keeps its cache key)."""
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    assert "train.fp8_base" not in resume_fields(load_recipe(path).recipe)
    fp8 = resume_fields(
        load_recipe(path, ["train.fp8_base=true", "train.gradient_checkpointing=true"]).recipe
    )
    assert fp8["train.fp8_base"] is True
    defaults = resume_fields(load_recipe(path).recipe)
    for name in ("snr_gamma", "noise_offset", "dataset.buckets"):
        assert not any(k.endswith(name) or f".{name}." in k for k in defaults), name
    weighted = resume_fields(load_recipe(path, ["train.snr_gamma=5", "train.noise_offset=0.1"]).recipe)
    assert weighted["train.snr_gamma"] == 5 and weighted["train.noise_offset"] == 0.1


def test_overlong_prompts_are_found(tmp_path):
    from transformers import CLIPTokenizer

    from recipe_runner.models.tokenizer import write_tiny_clip_tokenizer
    from recipe_runner.training.encoding import overlong_prompts

    write_tiny_clip_tokenizer(tmp_path, model_max_length=16)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    short = "a red circle on a blue background"
    long = " ".join(["a red circle"] * 10)
    assert overlong_prompts(tokenizer, [short, long]) == [long]


def test_a_field_left_out_at_its_default_is_shown_as_that_default():
    from recipe_runner.training.keys import changed_fields

    assert changed_fields({"train.snr_gamma": 5.0}, {}) == ["train.snr_gamma: 5.0 -> None (default)"]
    assert changed_fields({}, {"dataset.buckets.step": 16}) == ["dataset.buckets.step: (buckets off) -> 16"]
    assert changed_fields({"seed": 1}, {}) == ["seed: 1 -> (absent)"]
