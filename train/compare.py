"""Methods compared over seeds, paired by seed: tables with confidence intervals and p-values, per-run files, plots.

  python train/compare.py --seeds 5
  python train/compare.py --seeds 3 --config train/configs/default.py --config.num_epochs=10
  python train/compare.py --config train/configs/label_noise.py:0.4 --seeds 10 \
      --methods sgd,sam,aace_sam --baseline sgd,sam
  python train/compare.py --paper wrn28_10 --seeds 3 --config.data_dir=$HOME/tensorflow_datasets

`--methods` lists what to compare: a training method (`sgd`, `sam`,
`aace_sam`, `asam`), optionally followed by `:FIELD=VALUE` config changes
that make it a variant (`aace_sam:max_perturbation_norm=1.0`). Every method
is compared with each `--baseline` (default: the first method).

With `--paper MODEL` it runs the paper's table: the authors' runs of
`train/configs/paper.py` (SGD 400 epochs, SAM rho 0.05 normalized, AACE-SAM
rho 0.2) on each of `--datasets` (default: the paper's four), with the
`--config.FIELD` overrides of the command line applied to each.

Each (method, seed) is a full `train_and_evaluate` run in its own workdir
under `--workdir`, seed `config.seed + i` for i < `--seeds`; every method
of a seed runs before the next seed, and runs of one seed share their
initialization, data order, subset, noisy labels and augmentation draws.
The report (`train/compare_report.py`) is printed and written to
`compare.md`, with `compare.json` (per-run values and every statistic),
`compare.csv` (every epoch of every run) and `compare.png` beside it.

Stopped at any point (Ctrl-C, SIGTERM), it checkpoints the runs in progress;
the same command resumes them, and a later `--seeds 10` reuses the finished
seeds of an earlier `--seeds 3` in the same workdir; `--report_only` writes
the report of the runs finished so far and trains nothing. On a CPU, `--jobs`
(default: one per core) runs that many runs at once, each process on its
own core with one XLA thread, which `benchmarks/run_time.py processes`
measured faster than one process on every core; elsewhere it runs one at a
time in this process.
"""

import ctypes
import itertools
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from typing import NamedTuple
from typing import Optional

if __package__ in (None, ""):  # run as a script: make `train` and `aace_jax` importable
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import jax  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from train import checkpointing  # noqa: E402
from train import command_line  # noqa: E402
from train import compare_report  # noqa: E402
from train import compilation_cache  # noqa: E402
from train import config_checks  # noqa: E402
from train import methods  # noqa: E402
from train import run_files  # noqa: E402
from train import train  # noqa: E402
from train import variants  # noqa: E402
from train.configs import paper  # noqa: E402

METHODS = ("sgd", "sam", "aace_sam")
# One XLA thread per worker process: with a core each, the workers do not contend for the cores.
SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

FLAGS = flags.FLAGS
flags.DEFINE_integer("seeds", 5, "Runs per method, with seeds 0..N-1 added to config.seed.", lower_bound=1)
flags.DEFINE_string("workdir", None, "Where the runs and the report go; default: a new folder under ./runs/.")
command_line.define_config_flag("The config every run starts from.")
flags.DEFINE_bool("dry_run", False, "Check the command and the config, print the plan, and exit.")
flags.DEFINE_enum("paper", None, sorted(paper.MODELS), "Run the authors' recipe for this model on --datasets.")
flags.DEFINE_list("datasets", list(paper.DATASETS), "With --paper: the datasets of the table.")
flags.DEFINE_list("methods", list(METHODS), "METHOD[:FIELD=VALUE...] of each row; without --paper only.")
flags.DEFINE_list("baseline", None, "The --methods entries every other method is compared with; default: the first.")
flags.DEFINE_integer(
  "jobs", None, "Runs at once, each in its own process on its own core; default: one per core on a CPU, else 1.", 1
)
flags.DEFINE_bool("report_only", False, "Report the runs finished so far in --workdir; train nothing.")
flags.DEFINE_bool("worker", False, "Internal: run planned runs as one of --jobs processes, and report nothing.")


class PlannedRun(NamedTuple):
  """One (dataset, method, seed) of the comparison, with its config and workdir."""

  dataset: str
  method: str
  config: object
  run_dir: str


def planned_methods(base) -> list[tuple[str, str, object]]:
  """(dataset, method, config) of every method on every dataset, before seeds."""
  if FLAGS.paper is None:
    unknown = sorted(set(FLAGS.baseline or ()) - set(FLAGS.methods))
    if unknown:
      raise config_checks.ConfigError(f"--baseline {','.join(unknown)} is not among --methods {FLAGS.methods}.")
    return [(base.dataset, spec, variants.method_config(base, spec)) for spec in FLAGS.methods]
  if FLAGS["methods"].present or FLAGS["baseline"].present:
    raise config_checks.ConfigError("--methods and --baseline are for one config; --paper runs the paper's three.")
  unknown = sorted(set(FLAGS.datasets) - set(paper.DATASETS))
  if unknown:
    raise config_checks.ConfigError(
      f"Bad config: --datasets {unknown} are not among the paper's {list(paper.DATASETS)}."
    )
  overrides = config_flags.get_override_values(FLAGS["config"])
  runs = []
  for dataset in FLAGS.datasets:
    for method in METHODS:
      config = paper.get_config(f"{FLAGS.paper},{dataset},{method}")
      config.update_from_flattened_dict(overrides)
      runs.append((dataset, method, config))
  return runs


def planned_runs(method_configs: list, workdir: str, seeds: int) -> list[PlannedRun]:
  """Every run, seed by seed: all methods of a seed before the next, so that the runs finished are paired."""
  runs = []
  for offset, (dataset, method, base) in itertools.product(range(seeds), method_configs):
    config = base.copy_and_resolve_references()
    config.unlock()
    config.seed = base.seed + offset
    folder = re.sub(r"[^\w.=-]+", "_", method)
    runs.append(
      PlannedRun(
        dataset, method, config, os.path.join(workdir, dataset if FLAGS.paper else "", f"{folder}-seed{config.seed}")
      )
    )
  return runs


def run_name(run: PlannedRun) -> str:
  return f"{run.method} on {run.dataset}, seed {run.config.seed}"


def finished_rows(config, run_dir: str) -> Optional[list[dict]]:
  """The metrics.csv rows of a finished run of `config` in `run_dir`, or None when it has to run (or resume).

  Finished: its config.json holds the same recipe and its CSV a row for every
  epoch. The CSV is written after the checkpoint that holds its row, so a
  finished CSV is a finished run; anything else goes to `train_and_evaluate`,
  which resumes it or says why it cannot.
  """
  rows = run_files.RunFiles(run_dir, enabled=False).read() if os.path.isdir(run_dir) else []
  if [row["epoch"] for row in rows] != list(range(config.num_epochs)):
    return None
  try:
    config_checks.check_resumable(config, run_dir)
  except config_checks.ConfigError:
    return None
  return rows


def run_unfinished(runs: list[PlannedRun], *, announce: bool) -> None:
  """Trains every run not finished and not claimed by another process, in order, in this process.

  A run is claimed with a lock file in its workdir (`run_files.WorkdirLock`)
  before it starts, so that processes sharing the list (the `--jobs`
  workers, or the same command started twice) each take different runs.
  Exits, after checkpointing the run in progress, on SIGTERM or SIGINT.
  """
  for run in runs:
    if finished_rows(run.config, run.run_dir) is not None:
      continue
    os.makedirs(run.run_dir, exist_ok=True)
    claim = run_files.WorkdirLock(run.run_dir, name="claim")
    try:
      claim.acquire()
    except run_files.WorkdirBusy:
      continue  # another process trains it
    try:
      result = train.train_and_evaluate(run.config, run.run_dir)
    finally:
      claim.release()
    if result["stopped_by"] in train.SIGNAL_STOPS:  # finished or not: the next run must not start
      train.ignore_stop_signals()
      sys.exit(f"stopped by {result['stopped_by']} in {run.run_dir}; rerun the same command to resume the comparison.")
    if announce:
      print(f"{run_name(run)}: test accuracy {result['val_acc']:.4f}", flush=True)


def default_jobs() -> int:
  """One per core on a CPU; 1 on an accelerator, whose processes would share it."""
  return len(os.sched_getaffinity(0)) if jax.default_backend() == "cpu" else 1


def _end_with_parent() -> None:
  """In a worker, before it starts: SIGTERM when the parent dies (Linux's PR_SET_DEATHSIG), so a killed
  comparison does not leave runs training."""
  try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)
  except (OSError, AttributeError):
    pass


def run_in_workers(runs: list[PlannedRun], jobs: int, workdir: str) -> None:
  """Trains the unfinished runs in `jobs` worker processes, each pinned to a core with one XLA thread.

  Each worker is this command with ``--worker`` and takes the next run that no
  one has claimed (`run_unfinished`); its output goes to
  ``workdir/worker-N.log``, and this process prints each run as it finishes.
  SIGINT and SIGTERM are passed on to the workers, which checkpoint their
  runs and end.
  """
  cores = sorted(os.sched_getaffinity(0))
  environment = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_XLA_FLAGS}".strip()}
  command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", f"--workdir={workdir}"]
  os.makedirs(workdir, exist_ok=True)
  workers, logs = [], []
  for index in range(jobs):
    logs.append(os.path.join(workdir, f"worker-{index}.log"))
    with open(logs[-1], "ab") as log:
      core = cores[index % len(cores)]

      def pin(core=core):
        _end_with_parent()
        os.sched_setaffinity(0, {core})

      workers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, preexec_fn=pin))
  stopped = []

  def pass_on(signum, frame):
    del frame
    stopped.append(signal.Signals(signum).name)
    for worker in workers:
      if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)

  previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    announced = {run.run_dir for run in runs if finished_rows(run.config, run.run_dir) is not None}
    while any(worker.poll() is None for worker in workers):
      time.sleep(2)
      announced |= announce_finished(runs, announced)
    announce_finished(runs, announced)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  if stopped:
    train.ignore_stop_signals()
    sys.exit(f"stopped by {stopped[0]}; the runs in progress are checkpointed: rerun the same command to resume.")
  for worker, log in zip(workers, logs):
    if worker.returncode != 0:
      sys.exit(f"{last_line(log)} (worker log: {log})")


def announce_finished(runs: list[PlannedRun], announced: set) -> set:
  """Prints each run finished since `announced`; returns their workdirs."""
  new = set()
  for run in runs:
    if run.run_dir in announced:
      continue
    rows = finished_rows(run.config, run.run_dir)
    if rows is not None:
      print(
        f"{run.method} on {run.dataset}, seed {run.config.seed}: test accuracy {rows[-1]['val_acc']:.4f}", flush=True
      )
      new.add(run.run_dir)
  return new


def last_line(path: str) -> str:
  with open(path, errors="replace") as f:
    lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
  return lines[-1] if lines else f"a worker ended with no output ({path})"


def report(runs: list[PlannedRun], method_configs: list, workdir: str) -> None:
  """Writes and prints the report of the finished runs (`train/compare_report.py`)."""
  records, missing = [], []
  for run in runs:
    rows = finished_rows(run.config, run.run_dir)
    if rows is None:
      missing.append(run)
      continue
    label_noise = compare_report.read_label_noise(run.run_dir)
    records.append(
      compare_report.RunRecord(run.dataset, run.method, run.config.seed, methods.rho(run.config), rows, label_noise)
    )
  datasets = list(dict.fromkeys(dataset for dataset, _, _ in method_configs))
  names = list(dict.fromkeys(method for _, method, _ in method_configs))
  baselines = FLAGS.baseline or names[:1]
  sections, results = [], []
  for dataset in datasets:
    records_here = [r for r in records if r.dataset == dataset]
    results_here = compare_report.comparisons(records_here, names, baselines)
    for result in results_here:
      result["dataset"] = dataset
    config = next(config for d, _, config in method_configs if d == dataset)
    sections.append(compare_report.markdown(dataset, config, records_here, names, results_here))
    results += results_here
    if records_here:
      name = "compare.png" if len(datasets) == 1 else f"compare-{dataset}.png"
      compare_report.plot(records_here, names, os.path.join(workdir, name), title=f"{config.model} on {dataset}")
  text = "\n".join(sections)
  if missing:
    text += f"\nNot finished ({len(missing)}): {', '.join(os.path.basename(run.run_dir) for run in missing)}.\n"
  run_files.atomic_write(os.path.join(workdir, "compare.md"), text)
  run_files.atomic_write(os.path.join(workdir, "compare.json"), compare_report.summary_json(records, results))
  run_files.atomic_write(os.path.join(workdir, "compare.csv"), compare_report.epoch_csv(records))
  print(text)
  plots = "the plot" if len(datasets) == 1 else "the plots"
  where = os.path.abspath(os.path.join(workdir, "compare.md"))
  print(f"report: {where}; compare.json, compare.csv and {plots} beside it")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    method_configs = planned_methods(FLAGS.config)
    for _, _, config in method_configs:
      config_checks.check_config(config, device_count=None if FLAGS.dry_run else -1)
  except config_checks.ConfigError as error:
    sys.exit(f"error: {error}")
  if FLAGS.dry_run:
    for dataset, method, config in method_configs:
      print(f"would run {method} on {dataset} ({config.model}, {config.num_epochs} epochs) x {FLAGS.seeds} seeds")
    return
  workdir = FLAGS.workdir or os.path.join("runs", f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
  runs = planned_runs(method_configs, workdir, FLAGS.seeds)
  if FLAGS.report_only:
    if not os.path.isdir(workdir):
      sys.exit(f"error: --report_only: {workdir} holds no comparison")
    report(runs, method_configs, workdir)
    return
  jobs = 1 if FLAGS.worker else min(FLAGS.jobs or default_jobs(), len(runs))
  compilation_cache.enable(method_configs[0][2])
  try:
    if jobs > 1:
      run_in_workers(runs, jobs, workdir)
    else:
      run_unfinished(runs, announce=not FLAGS.worker)
  except checkpointing.CheckpointWriteError as error:
    train.exit_now(f"error: {error}")  # orbax's threads for later writes would keep the process alive
  except train.RUN_ERRORS as error:
    sys.exit(f"error: {error}")
  if not FLAGS.worker:
    report(runs, method_configs, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=command_line.parse_flags)
