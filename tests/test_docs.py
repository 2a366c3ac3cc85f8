"""The documentation: every code block of the README and of docs/ is exercised, and the site builds without a warning.

Python blocks run; shell commands are checked: those that train are run with
`--dry_run` (parsed and their config checked, nothing trained); the install
and test commands are what `.ci/run` runs; the commands of other tools
(`tfds build`, a TPU install) are checked against what the trainer tells
users. The Sphinx build (`-W`: warnings are errors) renders the API reference
from the docstrings, whose examples run as doctests in the main test run.
"""

import importlib
import importlib.util
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import load_script
from train import input_pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = {
  path.relative_to(REPO).as_posix(): path.read_text()
  for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
}
PYTHON_BLOCKS = [
  (name, index, code)
  for name, text in DOCUMENTS.items()
  for index, code in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL))
]
SHELL_LINES = sorted(
  {
    line.split(" #")[0].strip()
    for text in DOCUMENTS.values()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    for line in block.splitlines()
    if line.strip() and not line.strip().startswith("#")
  }
)
CI_SCRIPT = (REPO / ".ci" / "run").read_text()


def test_the_documents_have_code():
  assert {name for name, _, _ in PYTHON_BLOCKS} >= {"README.md", "docs/getting_started.md", "docs/any_model.md"}
  assert SHELL_LINES


@pytest.mark.parametrize(
  "name, index, code", PYTHON_BLOCKS, ids=[f"{name}:{index}" for name, index, _ in PYTHON_BLOCKS]
)
def test_python_block_runs(name, index, code):
  exec(compile(code, f"{name} python block {index}", "exec"), {"__name__": "__docs__"})


def test_the_site_builds_without_a_warning(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(REPO / "docs"), str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-5000:]
  # The plots of the docs are copied into the site and shown.
  shown = {path.name for path in (tmp_path / "_images").glob("*")}
  assert {pathlib.Path(target).name for name, target in IMAGES if name.startswith("docs/")} <= shown
  assert "Where a run" in (tmp_path / "results.html").read_text()  # benchmarks/RESULTS.md, included
  api = (tmp_path / "api.html").read_text()
  for name in ("aace_sam", "make_train_step", "shard_step", "LossInputs", "nnx_sharpness_aware_grads"):
    assert f'id="aace_jax.{name}"' in api, name


REPOSITORY_FILE_ADDRESS = re.compile(r"https://github\.com/aace-jax/aace-jax/(?:blob|raw|tree)/")
IMAGES = [
  (name, target) for name, text in DOCUMENTS.items() for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
]


def test_links_to_repository_files_are_relative_and_every_image_is_there():
  """A checkout, a fork and the site show the same images and files: no address of this repository's files."""
  absolute = [
    (name, line)
    for name, text in DOCUMENTS.items()
    for line in text.splitlines()
    if REPOSITORY_FILE_ADDRESS.search(line)
  ]
  assert not absolute
  assert IMAGES
  for name, target in IMAGES:
    assert not target.startswith(("http://", "https://")), (name, target)
    assert ((REPO / name).parent / target).is_file(), (name, target)


def test_every_page_is_in_the_table_of_contents():
  index = (REPO / "docs" / "index.md").read_text()
  pages = {path.stem for path in (REPO / "docs").glob("*.md")} - {"index"}
  assert pages and all(f"\n{page}\n" in index for page in pages), pages


def run_dry(command: str):
  words = shlex.split(command)
  if words[0] == "srun":
    words = words[1:]
  assert words[0] == "python"
  result = subprocess.run(
    ["bash", "-c", " ".join(shlex.quote(w) if "$" not in w else w for w in [sys.executable, *words[1:], "--dry_run"])],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=120,
  )
  assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"


# Commands that need the network, a TPU or a GPU, named in the docs of TFDS and JAX: not run here.
NOT_RUN_HERE = (
  "pip install tensorflow tensorflow-datasets",
  'pip install -U "jax[tpu]"',
  'pip install -U "jax[cuda12]" -e ".[train]"',  # the accelerator report's install, on a GPU machine
)


@pytest.mark.parametrize("line", SHELL_LINES)
def test_shell_command(line):
  not_run = []
  for command in (part.strip() for part in line.split("&&")):
    words = shlex.split(command)
    if command.startswith(("python train/main.py", "srun python train/main.py", "python train/compare.py")):
      run_dry(command)
    elif command.startswith("python train/evaluate_authors_checkpoint.py"):
      # Needs the authors' .pth file: its flags and config are parsed, nothing is read.
      result = subprocess.run(
        [sys.executable, *words[1:], "--helpshort"], capture_output=True, text=True, cwd=REPO, timeout=120
      )
      assert "--torch_checkpoint" in result.stdout and not result.stderr, result.stderr[-2000:]  # absl's help, no error
      assert (REPO / words[words.index("--config") + 1]).exists()
    elif command == "python -m pytest":
      assert "\npython -m pytest\n" in CI_SCRIPT
    elif words[0] == "ruff":
      assert f"\n{command}\n" in CI_SCRIPT
      result = subprocess.run([sys.executable, "-m", *words], capture_output=True, text=True, cwd=REPO, timeout=120)
      assert result.returncode == 0, result.stdout[-3000:]
    elif words[:3] == ["pip", "install", "-e"]:
      # The editable install of an extra of this project; .ci/run does the same for [test].
      assert words[3] in (".[train]", ".[test]", ".[bench]")
      assert 'pip install --quiet -e ".[test]"' in CI_SCRIPT
    elif words[:2] == ["apt-get", "install"]:
      # Debian's package of the four Fashion-MNIST files: what .ci/run installs and the trainer's error names.
      assert words[2:] == ["dataset-fashion-mnist"]
      assert "apt-get install -y -qq dataset-fashion-mnist" in CI_SCRIPT
    elif words[:2] == ["tfds", "build"]:
      # The command the trainer's missing-dataset error tells users to run.
      dataset = words[2]
      assert dataset in input_pipeline.DATASETS
      assert "--file_format=array_record" in words
    elif words[:2] == ["python", "train/plot_comparisons.py"]:
      load_script(REPO / words[1], "plot_comparisons").parse_args(words[2:])
    elif words[:2] == ["python", "examples/language_model.py"]:
      # Run in tests/test_language_model_example.py; its arguments are checked here.
      load_script(REPO / words[1], "language_model").parse_args(words[2:])
    elif command in NOT_RUN_HERE:
      not_run.append(command)
    elif words[0] == "python" and words[1] in (
      "benchmarks/step_time.py",
      "benchmarks/input_pipeline.py",
      "benchmarks/first_step.py",
      "benchmarks/vs_pytorch.py",
      "benchmarks/accelerator_report.py",
      "benchmarks/norm_forms.py",
      "benchmarks/run_time.py",
    ):
      sys.path.insert(0, str(REPO / "benchmarks"))
      script = importlib.import_module(pathlib.Path(words[1]).stem)
      script.parse_args(words[2:])
    else:
      pytest.fail(f"documented command not exercised by any test: {command}")
  if not_run:
    pytest.skip(f"the rest of the line checked; not run here (they need the network or a TPU): {not_run}")


def test_every_test_the_documents_cite_exists():
  """A guarantee's row names the tests that prove it: each named test and test file must exist."""
  defined = set()
  for path in (REPO / "tests").rglob("*.py"):
    defined |= set(re.findall(r"^\s*def (test_\w+)", path.read_text(), flags=re.MULTILINE))
  texts = {**DOCUMENTS, "benchmarks/RESULTS.md": (REPO / "benchmarks" / "RESULTS.md").read_text()}
  cited = {(name, test) for name, text in texts.items() for test in re.findall(r"`(test_\w+)`", text)}
  assert cited and not [(name, test) for name, test in cited if test not in defined]
  files = {(name, file) for name, text in texts.items() for file in re.findall(r"tests/([\w/]+\.py)", text)}
  assert not [(name, file) for name, file in files if not (REPO / "tests" / file).exists()]
