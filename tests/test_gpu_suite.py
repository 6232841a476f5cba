"""What the suite needs to run on a CUDA machine, checked where there is none.

On a CUDA machine the suite's default device is the GPU (conftest.py), and a random factory given a
CPU torch.Generator without a device raises there ("Expected a 'cuda' device type for generator"):
the pattern is caught here, in the test sources themselves. The GPU run (scripts/gpu.sh) limits each
test's time with conftest.py's own hook (the GPU machine has no pytest-timeout)."""
import ast
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from helpers import seeded_randn

FACTORIES = {"rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson", "rand_like",
             "randn_like", "randint_like"}
# in-place draws take no device: on a GPU tensor a CPU generator raises
IN_PLACE = {"normal_", "uniform_", "random_", "bernoulli_", "exponential_", "geometric_", "cauchy_", "log_normal_"}
SOURCES = sorted(pathlib.Path(__file__).parent.glob("*.py"))


def deviceless_draws(source: str) -> list[tuple[int, str]]:
    """(line, call) of each random factory given a generator and no device (multi-line calls too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        keywords = {k.arg for k in node.keywords}
        if "generator" in keywords and (name in IN_PLACE or (name in FACTORIES and "device" not in keywords)):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_check_catches_the_pattern():
    source = ("x = torch.randn(2,\n    3, generator=g)\ny = torch.randn(2, generator=g, device='cpu')\n"
              "p.normal_(0, 1, generator=g)\nz = torch.randint(0, 5, (3,), generator=g)\n")
    assert [line for line, _ in deviceless_draws(source)] == [1, 4, 5]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_random_factory_takes_a_generator_without_a_device(path):
    found = deviceless_draws(path.read_text())
    assert not found, f"{path.name}: draw on the CPU and move (helpers.seeded_randn): " + "; ".join(
        f"line {line}: {call}" for line, call in found)


def test_seeded_draws_replay_on_the_default_device():
    a = seeded_randn(3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    b = torch.randn(3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64, device="cpu")
    assert a.device == torch.get_default_device() and torch.equal(a.cpu(), b)


def test_a_test_past_its_time_limit_fails_by_name(tmp_path):
    tests = pathlib.Path(__file__).parent
    (tmp_path / "conftest.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('suite_conftest', {str(tests / 'conftest.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(mod)\n"
        "pytest_runtest_call = mod.pytest_runtest_call\n")
    (tmp_path / "test_slow.py").write_text("import time\n\n\ndef test_hangs():\n    time.sleep(60)\n\n\n"
                                           "def test_quick():\n    pass\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "-rfE",
                        str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, LDA_AQU_TEST_TIMEOUT="1"))
    assert "FAILED test_slow.py::test_hangs - TimeoutError" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert "1 failed, 1 passed" in r.stdout
