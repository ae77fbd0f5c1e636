"""Every public function and method of the library has type hints: each argument and the return value.

An AST check over ``ringbook/`` (nothing is imported): module-level functions
and the methods of public classes whose names do not start with ``_``;
``self``/``cls``/``ctx`` need no hint. The ``forward``/``backward`` of a
``torch.autograd.Function`` are framework hooks and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "ringbook"
IMPLICIT = ("self", "cls", "ctx")
AUTOGRAD_BASES = ("torch.autograd.Function", "autograd.Function", "Function")
AUTOGRAD_HOOKS = ("forward", "backward")


def _is_autograd_function(cls: ast.ClassDef) -> bool:
    return any(ast.unparse(base) in AUTOGRAD_BASES for base in cls.bases)


def _public_functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    functions = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions.append(node)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            hooks = AUTOGRAD_HOOKS if _is_autograd_function(node) else ()
            functions += [f for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                          and f.name not in hooks]
    return [f for f in functions if not f.name.startswith("_")]


def missing_hints(root: Path = LIBRARY) -> list[str]:
    """``file:line name args=[...] ret=...`` for every public function lacking a hint."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        for f in _public_functions(ast.parse(path.read_text(), filename=str(path))):
            args = [a for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs if a.arg not in IMPLICIT]
            bad = [a.arg for a in args if a.annotation is None]
            if bad or f.returns is None:
                problems.append(f"{path.relative_to(root.parent)}:{f.lineno} {f.name} args={bad} "
                                f"ret={'ok' if f.returns else 'missing'}")
    return problems


def test_the_check_sees_the_library():
    names = {f.name for path in LIBRARY.rglob("*.py") for f in _public_functions(ast.parse(path.read_text()))}
    assert {"naive_attention", "ring_attention", "production_ring_attention", "plot_results"} <= names
    engine = {f.name for f in _public_functions(ast.parse((LIBRARY / "fast" / "engine.py").read_text()))}
    assert {"run", "ring_forward", "forward_kv", "gradients"} <= engine  # functions and public classes' methods
    assert "forward" not in engine and "backward" not in engine  # RingFunction's autograd hooks


def test_the_check_finds_a_missing_hint(tmp_path):
    (tmp_path / "m.py").write_text(
        "import torch\n"
        "def f(x: int, *, y=1) -> int: ...\n"
        "def g(x: int): ...\n"
        "def _private(x): ...\n"
        "class C:\n"
        "    def m(self, t) -> None: ...\n"
        "    def _p(self, t): ...\n"
        "class F(torch.autograd.Function):\n"
        "    @staticmethod\n"
        "    def forward(ctx, x): ...\n"
        "    def other(self, x): ...\n"
    )
    assert missing_hints(tmp_path) == [
        f"{tmp_path.name}/m.py:2 f args=['y'] ret=ok",
        f"{tmp_path.name}/m.py:3 g args=[] ret=missing",
        f"{tmp_path.name}/m.py:6 m args=['t'] ret=ok",
        f"{tmp_path.name}/m.py:11 other args=['x'] ret=missing",
    ]


def test_every_public_function_has_type_hints():
    missing = missing_hints()
    assert not missing, "public functions without type hints:\n" + "\n".join(missing)
