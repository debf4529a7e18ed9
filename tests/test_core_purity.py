"""The core (topology, consensus, alignment, algorithms, tracking, partition, factors, optim,
metrics) imports no Ray and does no file I/O, so it can be tested, swapped and reused alone."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "decaf_ray"
CORE = ["topology", "topology_graphs", "consensus", "alignment", "algorithms", "tracking", "seeding",
        "partition", "factors", "optim", "metrics", "folding", "compress", "simtime",
        "network", "network_graphs"]
# reading a user-named matrix or edge-list file is topology's one allowed input
ALLOWED_IO = {"topology": {"load", "loadtxt", "open"}, "topology_graphs": {"read_text"}}
IO_CALLS = {"open", "read_text", "write_text", "read_bytes", "write_bytes", "save", "load",
            "loadtxt", "savetxt", "mkdir"}


def test_core_imports_no_ray():
    code = ("import sys\n"
            + "".join(f"import decaf_ray.{m}\n" for m in CORE)
            + "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", CORE)
def test_core_source_mentions_no_ray_and_no_file_io(module):
    tree = ast.parse((PKG / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n == "ray" or n.startswith("ray.") for n in names), module
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in IO_CALLS:
                assert name in ALLOWED_IO.get(module, set()), f"{module} calls {name}"
