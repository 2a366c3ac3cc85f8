"""benchmarks/accelerator_report.py: the smoke run CI makes, the budget, the preflight, the markdown it writes."""

import gzip
import json
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "accelerator_report.py"
sys.path.insert(0, str(BENCHMARKS))

import accelerator_report  # noqa: E402


def run(*arguments, timeout=600):
  return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("smoke") / "cpu.json"
  result = run("--smoke", "--out", str(out))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "smoke: every part ran and its markdown is complete" in result.stdout
  return out, json.loads(out.read_text())


def test_the_smoke_report_holds_every_part(smoke):
  _, report = smoke
  parts = report["parts"]
  assert set(parts) == set(accelerator_report.PARTS) and report["finished"]
  bfloat16 = parts["step_time"]["bfloat16"]
  assert set(bfloat16["results"]) == set(accelerator_report.STEP_METHODS)
  assert all(seconds > 0 for seconds in bfloat16["results"].values())
  assert set(parts["step_time"]["float32"]["results"]) == {"sgd", "sam", "aace_sam"}
  for mode in ("host_fed", "data_on_device"):
    trainer = parts["trainer"][mode]
    rates = trainer["trainer_images_per_sec"], trainer["step_images_per_sec"]
    expected_ms = 1000 * trainer["batch"] * (1 / rates[0] - 1 / rates[1])
    rounding_ms = 1000 * trainer["batch"] * sum(0.5 / rate**2 for rate in rates)  # the rates are whole img/s
    assert abs(trainer["host_ms_per_step"] - expected_ms) <= rounding_ms + 1e-3
    assert trainer["data_on_device"] == (mode == "data_on_device")
  [first_step] = parts["first_step"].values()
  cold, cached = first_step["cold"], first_step["cached"]
  assert cold["cache_misses"] > 0 and cold["cache_hits"] == 0
  assert cached["cache_misses"] == 0 and cached["cache_hits"] == cold["cache_misses"]
  assert cached["cache_entries"] == cold["cache_entries"]  # the cached process compiled nothing new
  assert cold["first_call_compiles"] == cached["first_call_compiles"] == 0  # compiled ahead, beside the init
  mfu = parts["mfu"]
  assert mfu["flops_per_step"] > 0 and mfu["seconds_per_step"] > 0 and len(mfu["top_ops"]) == 3
  assert mfu["mfu"] is None  # no peak rate is known for a CPU
  assert pathlib.Path(mfu["profile_dir"]).is_dir()
  norms = parts["norms"]
  # The concatenation's temporary buffer holds every parameter once; leaf by leaf holds far less.
  assert norms["concatenated"]["temp_bytes"] >= norms["param_bytes"] > norms["per_leaf"]["temp_bytes"]
  assert report["machine"]["backend"] == "cpu" and report["machine"]["versions"]["jax"]


def test_the_markdown_replaces_only_the_marked_sections(smoke, tmp_path):
  out, report = smoke
  results = tmp_path / "RESULTS.md"
  original = (BENCHMARKS / "RESULTS.md").read_text()
  results.write_text(original)
  written = run("--markdown", str(out), "--results", str(results), timeout=60)
  assert written.returncode == 0, written.stderr
  text = results.read_text()
  head, rest = original.split(accelerator_report.BEGIN)
  _, tail = rest.split(accelerator_report.END)
  assert text.startswith(head + accelerator_report.BEGIN) and text.endswith(accelerator_report.END + tail)
  block = text[len(head) : len(text) - len(tail)]
  assert "Not run: no accelerator" not in block
  assert f"| aace_sam_k4 | {report['parts']['step_time']['bfloat16']['results']['aace_sam_k4']:.4f} |" in block
  for heading in ("### Step time", "### Utilization", "### A global norm", "### The trainer", "### Time to the first"):
    assert heading in block
  assert "Not measured: torch is not importable here" in block
  # Writing the same report again changes nothing: the block is replaced, not appended.
  assert run("--markdown", str(out), "--results", str(results), timeout=60).returncode == 0
  assert results.read_text() == text


def test_the_results_page_holds_one_marked_block():
  text = (BENCHMARKS / "RESULTS.md").read_text()
  assert text.count(accelerator_report.BEGIN) == 1 and text.count(accelerator_report.END) == 1
  assert text.index(accelerator_report.BEGIN) < text.index(accelerator_report.END)


def test_a_short_budget_skips_parts_and_keeps_what_ran(tmp_path):
  out = tmp_path / "short.json"
  result = run("--smoke", "--budget", "40", "--out", str(out))
  assert result.returncode != 0 and "incomplete report" in result.stderr
  report = json.loads(out.read_text())  # written after every part: complete JSON, whatever ran
  statuses = {name: part.get("status") for name, part in report["parts"].items() if name != "step_time"}
  skipped = [part for part in report["parts"]["step_time"].values() if part["status"] == "skipped"]
  assert skipped and "of the budget left, the part needs about 60" in skipped[0]["reason"]
  assert "skipped" in statuses.values()
  markdown = accelerator_report.markdown(report)
  assert "Not measured: " in markdown and "of the budget left" in markdown
  assert "The run did not finish" not in markdown  # it did, with parts skipped
  killed = {**report, "finished": False}  # what a run killed between two parts leaves
  assert "The run did not finish" in accelerator_report.markdown(killed)


def test_without_an_accelerator_it_stops_before_measuring(tmp_path):
  result = run("--out", str(tmp_path / "gpu.json"), timeout=120)
  assert result.returncode != 0
  assert "JAX sees no accelerator (backend cpu)" in result.stderr and 'pip install -U "jax[cuda12]"' in result.stderr
  assert not (tmp_path / "gpu.json").exists() or "parts" in json.loads((tmp_path / "gpu.json").read_text())


def test_arguments_are_checked():
  assert run(timeout=60).returncode == 2
  result = run("--out", "x.json", "--budget", "0", timeout=60)
  assert result.returncode == 2 and "--budget must be a positive number of seconds, got 0.0" in result.stderr


def test_markers_missing_from_the_results_page_are_named(smoke, tmp_path):
  out, _ = smoke
  results = tmp_path / "RESULTS.md"
  results.write_text("# Results\n")
  result = run("--markdown", str(out), "--results", str(results), timeout=60)
  assert result.returncode != 0 and "must hold one <!-- accelerator-report:begin --> line" in result.stderr
  assert results.read_text() == "# Results\n"


def test_top_ops_read_the_device_lanes_of_a_trace(tmp_path):
  def trace(events, processes, threads):
    meta = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}} for pid, name in processes]
    meta += [{"ph": "M", "name": "thread_name", "pid": p, "tid": t, "args": {"name": n}} for p, t, n in threads]
    folder = tmp_path / str(len(list(tmp_path.iterdir())))
    (folder / "plugins").mkdir(parents=True)
    with gzip.open(folder / "plugins" / "perfetto_trace.json.gz", "wt") as f:
      json.dump({"traceEvents": meta + events}, f)
    return str(folder)

  gpu = trace(
    [
      {"ph": "X", "pid": 2, "tid": 1, "name": "fusion.3", "dur": 30.0},
      {"ph": "X", "pid": 2, "tid": 1, "name": "convolution.1", "dur": 50.0},
      {"ph": "X", "pid": 2, "tid": 2, "name": "fusion.3", "dur": 10.0},
      {"ph": "X", "pid": 2, "tid": 2, "name": "copy.2", "dur": 10.0},
      {"ph": "X", "pid": 1, "tid": 1, "name": "PjitFunction(step)", "dur": 500.0},  # the host's, not an op
    ],
    [(1, "/host:CPU"), (2, "/device:GPU:0")],
    [],
  )
  assert accelerator_report.top_ops(gpu) == [
    {"op": "convolution.1", "share": 0.5},
    {"op": "fusion.3", "share": 0.4},
    {"op": "copy.2", "share": 0.1},
  ]
  cpu = trace(
    [
      {"ph": "X", "pid": 1, "tid": 7, "name": "ynn_fusion", "dur": 3.0},
      {"ph": "X", "pid": 1, "tid": 7, "name": "ThunkExecutor::Execute", "dur": 90.0},  # the runtime, not an op
      {"ph": "X", "pid": 1, "tid": 1, "name": "$profiler.py:307 trace", "dur": 90.0},
      {"ph": "X", "pid": 1, "tid": 7, "name": "end: ynn_fusion", "dur": 1.0},
    ],
    [(1, "/host:CPU")],
    [(1, 7, "tf_XLAPjRtCpuClient/1"), (1, 1, "python")],
  )
  assert accelerator_report.top_ops(cpu) == [{"op": "ynn_fusion", "share": 1.0}]
