"""The folders are the architecture: imports flow one way (models <- training, models <- service)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "models": {"training", "service", "llmemb"},
    "training": {"service", "llmemb"},
    "service": {"training", "llmemb"},
}


def imported_top_level(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = {
        str(f.relative_to(ROOT)): sorted(imported_top_level(f) & FORBIDDEN[package])
        for f in files
        if imported_top_level(f) & FORBIDDEN[package]
    }
    assert not bad, f"{package}/ must not import {sorted(FORBIDDEN[package])}: {bad}"


def test_checker_sees_forbidden_imports(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("import training.srs\nfrom service.app import create_app\nfrom . import sibling\n")
    assert imported_top_level(f) == {"training", "service"}


def test_training_commands_need_no_service_dependencies() -> None:
    """`llmemb train ...` runs where only the training stack is installed (e.g. a bare GPU box)."""
    import subprocess
    import sys

    code = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "def guarded(name, *a, **k):\n"
        "    if name.split('.')[0] in ('pydantic', 'pydantic_settings', 'fastapi', 'uvicorn', 'faiss'):\n"
        "        raise ModuleNotFoundError(name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guarded\n"
        "import training.embed, training.evaluate, training.rat, training.scft, training.srs\n"
        "from llmemb.cli import build_parser\n"
        "args = build_parser().parse_args(['train', 'rat', '--method', 'LLMEmb'])\n"
        "print(args.method)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "LLMEmb"
