"""Set-up: the core imports and trains without the optional packages, the extras cover what the example imports,
CI runs the README's test command, and the planner's command line runs without warnings."""

import ast
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Packages that only the example, the notebook, PEFT users, the Triton kernels or the tests need.
OPTIONAL = ("datasets", "evaluate", "peft", "matplotlib", "tensorboard", "triton", "psutil", "pandas", "nbclient")


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, *args, "-c", code] if code else [sys.executable, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def setup_requirements() -> tuple[list[str], dict[str, list[str]]]:
    """``install_requires`` and ``extras_require`` of setup.py, evaluated from its source (setup() not run)."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    names: dict = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            names[node.targets[0].id] = eval(compile(ast.Expression(node.value), "setup.py", "eval"), {}, names)
    call = next(n.value for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call))
    keywords = {k.arg: eval(compile(ast.Expression(k.value), "setup.py", "eval"), {}, names) for k in call.keywords
                if k.arg in ("install_requires", "extras_require")}
    return keywords["install_requires"], keywords["extras_require"]


def distribution(requirement: str) -> str:
    return re.split(r"[<>=!;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("-", "_")


@pytest.mark.slow
def test_core_imports_and_trains_a_step_without_the_optional_packages():
    """With every optional package hidden (as if not installed), `import mst_hf` works and an MST step with sparse
    attention runs; the example support modules import too (they import their extras where used)."""
    code = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None  # `import name` now fails, and find_spec reports it missing
import torch
import mst_hf, mst_hf.arguments, mst_hf.embedded, mst_hf.plotting, mst_hf.reporting
from transformers import GPT2Config, GPT2LMHeadModel
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=64))
ctl = mst_hf.MSTController(model, mst_hf.MSTConfig(ultra_sparsity=0.5, warmup_ratio=0.0, hsa_pattern="local",
                                                   hsa_window=4, update_interval=1))
batch = {{"input_ids": torch.randint(0, 64, (2, 16))}}
ctl.before_forward(0, 4, batch)
model(**batch, labels=batch["input_ids"]).loss.backward()
ctl.after_backward(0, 4)
loaded = sorted(name for name in {OPTIONAL!r} if sys.modules.get(name) is not None)
print("ok", round(ctl.masks.sparsity(), 2), loaded)
"""
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout.split()[-3:] == ["ok", "0.5", "[]"], proc.stderr[-3000:]


@pytest.mark.slow
def test_load_embedded_dataset_without_datasets_names_the_extra():
    code = "import sys; sys.modules['datasets'] = None\nfrom mst_hf.embedded import load_embedded_dataset\n" \
           "load_embedded_dataset()"
    proc = run_python(code)
    assert proc.returncode != 0 and '.[example]' in proc.stderr.splitlines()[-1]


def test_install_requires_are_the_core_packages_and_extras_cover_the_example():
    install, extras = setup_requirements()
    core = sorted(distribution(r) for r in install)
    example_tree = ast.parse(open(os.path.join(ROOT, "examples", "run_clm_mst.py"), encoding="utf-8").read())
    imported = {alias.name.split(".")[0] for node in ast.walk(example_tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(example_tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    third_party = imported - set(sys.stdlib_module_names) - {"mst_hf"}
    provided = set(core) | {distribution(r) for r in extras["example"]}
    assert (core, sorted(third_party - provided)) == (
        ["accelerate", "huggingface_hub", "numpy", "safetensors", "torch", "transformers"], [])


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    command = re.search(r"pip install -e (\S+) && HF_HUB_OFFLINE=1 python -m pytest -q", readme)
    assert command is not None and f"pip install -q -e {command.group(1)}\n" in ci and ci.rstrip().endswith(
        "python3 -m pytest -q")


@pytest.mark.slow
def test_plan_command_line_prints_no_runpy_warning():
    proc = run_python("", "-m", "mst_hf.plan", "--preset", "gpt2-4x", "--steps", "1000", "--json")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (proc.returncode, "Warning" in proc.stderr, summary["total_steps"]) == (0, False, 1000), proc.stderr


def test_every_shipped_data_folder_has_its_license_notes():
    data = os.path.join(ROOT, "mst_hf", "data")
    folders = sorted(f for f in os.listdir(data) if os.path.isdir(os.path.join(data, f)))
    missing = [f for f in folders if not os.path.isfile(os.path.join(data, f, "LICENSE"))]
    assert len(folders) >= 2 and missing == []
