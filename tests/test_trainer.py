"""End-to-end runs of the reference trainer on digits and mock CIFAR-10."""

import glob
import json
import os
import pathlib
import struct
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorboardX.proto import event_pb2

from tests.helpers import REPO
from tests.helpers import assert_same_checkpoint
from tests.helpers import latest_checkpoint
from tests.helpers import read_csv
from tests.helpers import small_config
from train import config_checks
from train import epoch_row
from train import methods
from train import train


def read_events(workdir):
  """Scalars of the TensorBoard event files, parsed from their record framing."""
  scalars = {}
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    data = pathlib.Path(path).read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_digits_run_writes_every_output(tmp_path):
  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(small_config(), workdir)
  assert result["finished"] and result["epoch"] == 1
  rows = read_csv(workdir)
  assert [int(r["epoch"]) for r in rows] == [0, 1]
  assert tuple(rows[0]) == epoch_row.CSV_COLUMNS
  # Without a validation split its columns are NaN (and left out of the events); every other value is finite.
  holdout = {"holdout_loss", "holdout_acc"}
  assert all(np.isnan(float(row[c])) for row in rows for c in holdout)
  assert all(np.isfinite(float(v)) for row in rows for c, v in row.items() if c not in holdout)
  assert float(rows[1]["val_acc"]) == pytest.approx(result["val_acc"])
  assert float(rows[0]["avg_perturbation"]) > 0 and float(rows[0]["avg_grad_norm"]) > 0
  # avg_aace_loss is KL(q || p) as the authors log it, avg_aace_ce the cross-entropy: larger by H(q) > 0.
  assert 0 < float(rows[0]["avg_aace_loss"]) < float(rows[0]["avg_aace_ce"])
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["method"] == "aace_sam"
  scalars = read_events(workdir)
  assert [step for step, _ in scalars["val_acc"]] == [1, 2] and "holdout_acc" not in scalars
  assert scalars["val_acc"][-1][1] == pytest.approx(result["val_acc"], rel=1e-6)
  for name in ("loss", "perturbation", "accuracy"):
    assert (pathlib.Path(workdir) / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  step, tree = latest_checkpoint(workdir)
  assert step == 2 * (1438 // 64) and int(tree["step"]) == step


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(small_config(), straight)
  halted = train.train_and_evaluate(small_config(halt_after_epochs=1), resumed)
  assert not halted["finished"] and halted["epoch"] == 0
  train.train_and_evaluate(small_config(), resumed)

  assert_same_checkpoint(straight, resumed)
  rows_a, rows_b = read_csv(straight), read_csv(resumed)
  assert len(rows_b) == 2  # one header, no duplicate rows
  for row_a, row_b in zip(rows_a, rows_b):
    for column in ("lr", "avg_ce_loss", "avg_aace_loss", "avg_perturbation", "train_loss", "val_loss", "val_acc"):
      assert row_a[column] == row_b[column], column
  with open(os.path.join(resumed, "metrics.csv")) as f:
    assert f.read().count("epoch,") == 1


def test_cheaper_steps_resumed_in_the_middle_of_a_cycle_are_bit_identical(tmp_path):
  # 22 steps an epoch: the halt after epoch 1 falls on the second step of a 3-step cycle.
  cheaper = dict(perturb_every=3, perturbation_batch_fraction=0.5)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(small_config(**cheaper), straight)
  train.train_and_evaluate(small_config(halt_after_epochs=1, **cheaper), resumed)
  train.train_and_evaluate(small_config(**cheaper), resumed)
  assert_same_checkpoint(straight, resumed)
  _, tree = latest_checkpoint(straight)
  assert int(tree["opt_state"]["steps_since_perturbation"]) == 44 % 3


def test_mock_cifar10_run(tmp_path):
  config = small_config(
    dataset="cifar10",
    num_epochs=1,
    batch_size=16,
    eval_batch_size=16,
    method="sam",
    decoded_cache_dir=str(tmp_path / "decoded"),
  )
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    result = train.train_and_evaluate(config, str(tmp_path / "cifar"))
  assert result["finished"]
  assert len(read_csv(str(tmp_path / "cifar"))) == 1
  # Both splits were decoded once and cached for the next run.
  assert len(list((tmp_path / "decoded").glob("cifar10-*.npz"))) == 2


@pytest.mark.parametrize("method", ["sgd", "sam", "asam"])
def test_every_method_trains(tmp_path, method):
  result = train.train_and_evaluate(small_config(method=method, num_epochs=1), str(tmp_path / method))
  assert result["finished"] and result["val_acc"] > 0.3
  rows = read_csv(str(tmp_path / method))
  if method == "sgd":
    assert float(rows[0]["avg_perturbation"]) == 0


def test_learning_rate_schedule_is_the_authors():
  # 10 epochs of 7 steps: x0.2 from epoch 3, 6 and 8, taking effect one step late.
  config = small_config(num_epochs=10)
  schedule = methods.learning_rate_schedule(config, steps_per_epoch=7)
  expected = {0: 0.1, 21: 0.1, 22: 0.02, 42: 0.02, 43: 0.004, 56: 0.004, 57: 0.0008, 69: 0.0008}
  for step, lr in expected.items():
    assert float(schedule(step)) == pytest.approx(lr), step


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(method="adam"), "method 'adam' is not one of"),
    (dict(dataset="imagenet"), "dataset 'imagenet' is not one of"),
    (dict(model="resnet"), "model 'resnet' is not one of"),
    # The method's arguments are checked by the library, with its messages and ranges.
    (dict(rho=-0.1), r"field rho: aace_sam: rho must lie in \[0.0, inf\], got -0.1"),
    (dict(aace_threshold=1.5), r"field aace_threshold: aace_cross_entropy: threshold must lie in \[0.0, 1.0\]"),
    (dict(aace_mode="soft"), r"field aace_mode: aace_cross_entropy: mode must be one of"),
    (dict(label_smoothing=-0.1), r"field label_smoothing: cross_entropy: label_smoothing must lie in"),
    (dict(perturb_every=0), r"field perturb_every: aace_sam: perturb_every must be a positive Python int.*got 0"),
    (dict(perturbation_batch_fraction=0.0), r"perturbation_batch_fraction must lie in \(0, 1\], got 0.0"),
    (dict(method="sgd", perturb_every=2), "perturb_every and perturbation_batch_fraction apply to a sharpness"),
    (dict(perturbation_batch_fraction=0.5, grad_accum_steps=64), "perturbation_batch_fraction=0.5 of the per-device"),
    (dict(sync_perturbation=False, perturb_every=2), "would keep a different perturbation on each device"),
  ],
)
def test_bad_config_fails_before_writing(tmp_path, overrides, message):
  workdir = tmp_path / "run"
  with pytest.raises(config_checks.ConfigError, match=message):
    train.train_and_evaluate(small_config(**overrides), str(workdir))
  assert not workdir.exists()


def test_batch_not_divisible_by_devices(monkeypatch, tmp_path):
  monkeypatch.setattr(train.jax, "device_count", lambda: 8)
  with pytest.raises(config_checks.ConfigError, match="batch_size 60 is not divisible by the 8 devices"):
    train.train_and_evaluate(small_config(batch_size=60), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_resuming_with_another_config_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(small_config(num_epochs=1), workdir)
  with pytest.raises(config_checks.ConfigError, match="fields model differ"):
    train.train_and_evaluate(small_config(num_epochs=1, model="wrn16_4"), workdir)


def run_main(*args, timeout=300):
  return subprocess.run(
    [sys.executable, str(REPO / "train" / "main.py"), *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=REPO,
  )


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config.method=adam"], "error: Bad config: method 'adam' is not one of"),
    (["--config.rho=-1"], "error: Bad config field rho: aace_sam: rho must lie in [0.0, inf], got -1.0"),
    (["--config.dataset=svhn"], "error: Bad config: dataset 'svhn' is not one of"),
    (["--config.no_such_field=1"], "no_such_field"),
    (["--config.batch_size=4096"], "error: batch_size 4096 is larger than the"),
    (
      ["--config", "train/configs/wrn28_10_cifar100.py", "--config.data_dir=/nonexistent"],
      "tfds build cifar100 --file_format=array_record",
    ),
  ],
)
def test_main_rejects_bad_input_in_one_line(tmp_path, args, message):
  workdir = tmp_path / "run"
  result = run_main("--workdir", str(workdir), *args)
  assert result.returncode != 0
  assert message in result.stderr
  error_lines = [line for line in result.stderr.splitlines() if message.split()[0] in line]
  assert error_lines, result.stderr[-2000:]
  assert not workdir.exists()


def test_default_run_is_fast_and_accurate(tmp_path):
  """`python train/main.py` as a user runs it: offline, under two minutes, ends with a summary."""
  workdir = tmp_path / "default"
  result = run_main("--workdir", str(workdir), timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = result.stdout.strip().splitlines()[-1]
  assert summary.startswith("finished: test accuracy") and str(workdir) in summary
  accuracy = float(summary.split("test accuracy ")[1].split()[0])
  seconds = float(summary.split(" in ")[1].split(" s;")[0])
  assert accuracy > 0.9
  assert seconds < 120
  assert "warning:" not in result.stdout  # the default run does not break down


HEALTHY = {"epoch": 3, "avg_ce_loss": 1.0, "train_loss": 1.05, "avg_perturbation": 0.05, "avg_param_norm": 20.0}


@pytest.mark.parametrize(
  "changes, expected",
  [
    ({}, None),
    ({"train_loss": 0.91}, None),  # lower, but within the ratio
    ({"train_loss": 0.89}, "epoch 4: the training loss at the perturbed weights (0.8900) is below 0.9 x the loss"),
    ({"avg_perturbation": 1.01}, "epoch 4: the perturbation's norm (1.01) exceeds 0.05 x the weights' norm (20)"),
    ({"avg_ce_loss": float("nan"), "train_loss": float("nan"), "avg_perturbation": float("nan")}, None),
    ({"avg_perturbation": 0.0, "train_loss": 1.0}, None),  # SGD
  ],
)
def test_breakdown_warning_reads_the_two_signs_from_the_epoch_row(changes, expected):
  warning = train.breakdown_warning({**HEALTHY, **changes}, small_config())
  if expected is None:
    assert warning is None
  else:
    assert warning.startswith(expected) and "--config.max_perturbation_norm" in warning
  assert (
    train.breakdown_warning(
      {**HEALTHY, **changes}, small_config(**dict.fromkeys(("warn_loss_at_w_adv_ratio", "warn_relative_perturbation")))
    )
    is None
  )


def test_a_run_whose_perturbation_is_too_long_is_warned_and_the_cap_silences_it(tmp_path, capsys):
  # rho 20 stalls the digits run (test accuracy about 0.15 after 2 epochs); the warning comes after epoch 1.
  train.train_and_evaluate(small_config(rho=20.0, num_epochs=1), str(tmp_path / "free"))
  assert "warning: epoch 1: the perturbation's norm" in capsys.readouterr().out
  rows = read_csv(str(tmp_path / "free"))
  assert float(rows[0]["avg_perturbation"]) > 0.05 * float(rows[0]["avg_param_norm"])
  train.train_and_evaluate(small_config(rho=20.0, num_epochs=1, max_perturbation_norm=0.1), str(tmp_path / "capped"))
  assert "warning:" not in capsys.readouterr().out
  assert float(read_csv(str(tmp_path / "capped"))[0]["avg_perturbation"]) <= 0.1 * (1 + 1e-6)


def test_split_on_the_devices_trains_exactly_like_host_batches(tmp_path):
  """`data_on_device` gathers each batch on the devices: the same batches, augmentation and run."""
  host, device = str(tmp_path / "host"), str(tmp_path / "device")
  train.train_and_evaluate(small_config(num_epochs=1), host)
  train.train_and_evaluate(small_config(num_epochs=1, data_on_device=True), device)
  assert_same_checkpoint(host, device)
  assert read_csv(host)[0]["train_loss"] == read_csv(device)[0]["train_loss"]


def test_second_process_loads_the_compiled_steps_from_the_cache(tmp_path):
  cache = tmp_path / "xla"
  args = ["--config.num_epochs=1", f"--config.compilation_cache_dir={cache}"]
  first = run_main("--workdir", str(tmp_path / "first"), *args)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "compilation cache: 0 hits" in first.stdout
  entries = sorted(p.name for p in cache.iterdir())
  assert entries
  second = run_main("--workdir", str(tmp_path / "second"), *args)
  assert second.returncode == 0, second.stderr[-3000:]
  hits = second.stdout.split("compilation cache: ")[1].split(")")[0]
  assert hits.endswith(" hits, 0 misses") and not hits.startswith("0 hits"), hits
  assert sorted(p.name for p in cache.iterdir()) == entries  # nothing compiled anew


@pytest.mark.parametrize("data_on_device, perturb_every", [(False, 1), (True, 1), (False, 3)])
def test_train_step_compiles_once_beside_the_init_or_restore(tmp_path, data_on_device, perturb_every):
  """The step (both steps, with perturb_every > 1) compiles from the state's shapes in a thread while the state
  initializes or is restored; the first step then finds it compiled."""
  step_name = "jit(resident_step)" if data_on_device else "jit(host_fed_step)"
  compiling_threads = []

  def record(event, duration, *, fun_name="", **kwargs):
    if event == "/jax/core/compile/backend_compile_duration" and fun_name == step_name:
      compiling_threads.append(threading.current_thread().name)

  jax.monitoring.register_event_duration_secs_listener(record)
  try:
    config = small_config(data_on_device=data_on_device, halt_after_epochs=1, perturb_every=perturb_every)
    for run in ("new", "resumed"):
      compiling_threads.clear()
      train.train_and_evaluate(config, str(tmp_path))
      assert len(compiling_threads) == (1 if perturb_every == 1 else 2), run
      assert all(thread.startswith("compile_train_step") for thread in compiling_threads), run
  finally:
    jax.monitoring.unregister_event_duration_listener(record)
  assert read_csv(tmp_path)[-1]["epoch"] == "1"  # the second run resumed


@pytest.mark.parametrize("model", ["wrn28_10", "pyramidnet272"])
@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "fashion_mnist", "food101"])
def test_paper_configs_are_the_authors_runs(model, dataset):
  from train.configs import paper

  runs = {method: paper.get_config(f"{model},{dataset},{method}") for method in ("sgd", "sam", "aace_sam")}
  for config in runs.values():
    config_checks.check_config(config, device_count=None)
    assert config.dataset == dataset and config.learning_rate == 0.1 and config.momentum == 0.9
    assert config.weight_decay == 5e-4 and tuple(config.lr_milestones) == (0.3, 0.6, 0.8) and config.seed == 42
  assert runs["sgd"].num_epochs == 400 and runs["sam"].num_epochs == runs["aace_sam"].num_epochs == 200
  assert (runs["sam"].rho, runs["sam"].normalize) == (0.05, True)
  assert (runs["aace_sam"].rho, runs["aace_sam"].normalize) == (0.2, False)
  expected = {"wrn28_10": ("wrn28_10_authors", 256), "pyramidnet272": ("pyramidnet272", 64)}[model]
  assert all((c.model, c.batch_size) == expected for c in runs.values())


def test_compare_plans_the_paper_table_with_the_command_line_overrides():
  result = subprocess.run(
    [
      sys.executable,
      str(REPO / "train" / "compare.py"),
      "--paper",
      "pyramidnet272",
      "--datasets",
      "cifar10,food101",
      "--seeds",
      "2",
      "--config.num_epochs=7",
      "--dry_run",
    ],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert lines == [
    f"would run {m} on {d} (pyramidnet272, 7 epochs) x 2 seeds"
    for d in ("cifar10", "food101")
    for m in ("sgd", "sam", "aace_sam")
  ]


def test_compare_plans_variants_of_a_method_and_refuses_a_bad_one():
  command = [sys.executable, str(REPO / "train" / "compare.py"), "--seeds", "3", "--dry_run"]
  variants = "sgd,aace_sam:normalize=True:rho=0.05,aace_sam:max_perturbation_norm=1.5"
  result = subprocess.run([*command, f"--methods={variants}"], capture_output=True, text=True, timeout=120, cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines() == [
    f"would run {spec} on digits (small_cnn, 30 epochs) x 3 seeds" for spec in variants.split(",")
  ]
  for bad, message in [
    ("aace_sam:no_such_field=1", "the config has no field 'no_such_field'"),
    ("adam", "'adam' is not one of"),
    ("sam:rho", "'rho' is not FIELD=VALUE"),
    ("sam:rho=-1", "rho must lie in"),
  ]:
    result = subprocess.run([*command, f"--methods={bad}"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1 and message in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]


def test_compare_runs_the_methods_and_variants_each_with_its_own_rho(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      str(REPO / "train" / "compare.py"),
      "--seeds",
      "1",
      "--workdir",
      str(tmp_path),
      "--config.num_epochs=1",
      "--config.compilation_cache=False",
      "--methods=sgd,sam,aace_sam,aace_sam:rho=0.05",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  table = (tmp_path / "compare.md").read_text()
  # Each row's rho is its own run's: the variant's change, else the method's default.
  for row in ("| sgd | - |", "| sam | 0.05 |", "| aace_sam | 0.2 |", "| aace_sam:rho=0.05 | 0.05 |"):
    assert row in table, table
  assert (tmp_path / "compare.png").exists()


def test_resumed_run_restores_into_shapes_without_initializing(monkeypatch, tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train_and_evaluate(small_config(), straight)
  train.train_and_evaluate(small_config(halt_after_epochs=1), resumed)

  def no_init(*args, **kwargs):
    raise AssertionError("a resumed run initialized the parameters")

  monkeypatch.setattr(train.models, "run_init", no_init)
  assert train.train_and_evaluate(small_config(), resumed)["finished"]
  assert_same_checkpoint(straight, resumed)


def test_init_program_is_the_same_for_every_seed(monkeypatch):
  # The persistent cache then serves a run with a new seed: only the key differs, and it is an argument.
  compiled_texts = []
  real_compile = jax.stages.Lowered.compile

  def recording_compile(self, *args, **kwargs):
    compiled_texts.append(self.as_text())
    return real_compile(self, *args, **kwargs)

  monkeypatch.setattr(jax.stages.Lowered, "compile", recording_compile)
  states = [train.create_experiment(small_config(seed=seed)).init_state() for seed in (0, 1)]
  assert len(compiled_texts) == 2 and compiled_texts[0] == compiled_texts[1]
  # The seed still reaches the state: other parameters, another run key.
  assert not np.array_equal(states[0].params["Dense_0"]["kernel"], states[1].params["Dense_0"]["kernel"])
  assert not np.array_equal(jax.random.key_data(states[0].rng), jax.random.key_data(states[1].rng))


def test_bfloat16_run_matches_float32_accuracy(tmp_path):
  f32 = train.train_and_evaluate(small_config(num_epochs=8), str(tmp_path / "f32"))
  bf16 = train.train_and_evaluate(small_config(num_epochs=8, dtype="bfloat16"), str(tmp_path / "bf16"))
  assert f32["val_acc"] > 0.9
  assert abs(bf16["val_acc"] - f32["val_acc"]) <= 0.02
  _, tree = latest_checkpoint(str(tmp_path / "bf16"))
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(tree["params"]))


def test_gradient_accumulation_in_the_trainer_gives_the_same_run(tmp_path):
  # The linear model has no BatchNorm (whose micro-batches would normalize on their own), so 4
  # micro-batches of 16 must give the run of one batch of 64: the same weights, up to float32 sums.
  whole, accumulated = str(tmp_path / "whole"), str(tmp_path / "accumulated")
  train.train_and_evaluate(small_config(model="linear", num_epochs=1), whole)
  train.train_and_evaluate(small_config(model="linear", num_epochs=1, grad_accum_steps=4), accumulated)
  assert_same_checkpoint(whole, accumulated, rtol=1e-5, atol=1e-6)
  row_whole, row_accumulated = read_csv(whole)[0], read_csv(accumulated)[0]
  for column in ("avg_ce_loss", "avg_perturbation", "train_loss", "train_acc", "val_loss", "val_acc"):
    assert float(row_accumulated[column]) == pytest.approx(float(row_whole[column]), rel=1e-5), column
  # And the option reaches the step: with BatchNorm, 4 micro-batches normalize otherwise than one batch.
  train.train_and_evaluate(small_config(num_epochs=1), str(tmp_path / "bn_whole"))
  train.train_and_evaluate(small_config(num_epochs=1, grad_accum_steps=4), str(tmp_path / "bn_accumulated"))
  with pytest.raises(AssertionError):
    assert_same_checkpoint(str(tmp_path / "bn_whole"), str(tmp_path / "bn_accumulated"), rtol=1e-3)
  with pytest.raises(config_checks.ConfigError, match="does not split into grad_accum_steps=3"):
    train.train_and_evaluate(small_config(grad_accum_steps=3), str(tmp_path / "bad"))


def test_old_field_names_are_taken_into_the_new_fields_with_a_warning():
  config = small_config()
  config.optimizer = "sam"
  with pytest.warns(
    FutureWarning, match=r"config.optimizer is deprecated .* now config.method \(--config.method=sam\)"
  ):
    config_checks.check_fields(config)
  assert config.method == "sam" and config.optimizer is None
  config.warn_perturbed_loss_ratio = 0.5
  renamed = r"config.warn_perturbed_loss_ratio is deprecated .* now config.warn_loss_at_w_adv_ratio \(--config"
  with pytest.warns(FutureWarning, match=renamed):
    config_checks.check_fields(config)
  assert config.warn_loss_at_w_adv_ratio == 0.5 and config.warn_perturbed_loss_ratio is None
  result = subprocess.run(
    [sys.executable, str(REPO / "train" / "main.py"), "--config.optimizer=sgd", "--dry_run"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "method: sgd" in result.stdout and "config.optimizer is deprecated" in result.stderr
