"""Imports go downward only (docs/architecture.md, "Layers"): every module of downpour/ is parsed
(ast, nothing imported) and each import of another part of the package is checked against the
layer order below. A new upward import, or one role importing another, fails the test and names
the line; the few exceptions are listed with their reasons."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "downpour"

# Lowest first. A module may import from its own layer or any lower one; within a layer, the
# parts marked as peers (the roles) may not import each other. A part is a top-level package or
# module of downpour/, or a module named in full where it sits elsewhere than its package.
LAYERS: list[set[str]] = [
    {"errors", "imports", "hashing", "processes"},
    {"transport", "sparse", "nn"},
    {"config"},
    {"protocol", "layout", "models", "data", "stream"},
    {"compress", "storage", "monitor", "coordinator.client"},  # the coordinator's contract, as nodes see it
    {"coordinator", "server", "worker", "extensions"},
    {"serving", "export", "launch"},
    {"api", "cli", "scheduler", "__init__", "__main__"},
]
PEERS = {"coordinator", "server", "worker"}

# Known exceptions: (importing module, imported module) -> why. Keep this list short.
ALLOWED = {
    ("downpour.config", "downpour.server.optim"):
        "a registered update rule's name is checked against the rules' registry when a job is parsed (lazy import)",
    ("downpour.coordinator.service", "downpour.server.scaling"):
        "the coordinator checks warm-up and lr schedule against the job's length before it starts (the servers' rules)",
    ("downpour.coordinator.service", "downpour.serving.export"):
        "with export.url the coordinator exports each committed checkpoint for serving, on a thread (lazy import)",
}
THIRD_PARTY = {"zmq": "transport"}  # a third-party package and the only part that may import it


def part_of(module: str, layers: list[set[str]]) -> str:
    """The layer entry ``module`` (``downpour.a.b``) belongs to: its full name if listed, else its top part."""
    names = module.split(".")[1:] or ["__init__"]
    known = set().union(*layers)
    for i in range(len(names), 0, -1):
        if ".".join(names[:i]) in known:
            return ".".join(names[:i])
    return names[0]


def level(part: str, layers: list[set[str]]) -> int:
    for i, layer in enumerate(layers):
        if part in layer:
            return i
    raise KeyError(f"{part} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def module_name(path: Path, root: Path) -> str:
    """``pkg.a.b`` for root/a/b.py and root/a/b/__init__.py; ``pkg.__init__`` for root/__init__.py."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module or module.name) of every import in the file that names the package or a
    third-party package of :data:`THIRD_PARTY`, relative ones resolved, at any depth (lazy ones too)."""
    tree = ast.parse(path.read_text(), str(path))
    rel = list(path.relative_to(root.parent).with_suffix("").parts)
    package = rel[:-1]  # the package a relative import starts from
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                start = package[: len(package) - (node.level - 1)]
                base = ".".join([*start, base] if base else start)
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]  # a name may be a module
    return [(line, m) for line, m in out if m.split(".")[0] in (root.name, *THIRD_PARTY)]


def violations(root: Path, layers: list[set[str]] = LAYERS, peers: set[str] = PEERS,
               allowed: dict[tuple[str, str], str] | None = None) -> list[str]:
    """Every import in the package at ``root`` that goes upward, crosses between peers, or uses a
    third-party package outside its part."""
    allowed = ALLOWED if allowed is None else allowed
    package = root.name
    found = []
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path, root)
        src = part_of(mod, layers)
        for line, target in imports_of(path, root):
            where = f"{path.relative_to(root.parent)}:{line}"
            top = target.split(".")[0]
            if top in THIRD_PARTY:
                if src != THIRD_PARTY[top]:
                    found.append(f"{where}: {mod} imports {target}; only {package}/{THIRD_PARTY[top]}/ may")
                continue
            dst = part_of(target, layers)
            if dst == src or any((mod, t) in allowed for t in _prefixes(target)):
                continue
            if level(dst, layers) > level(src, layers):
                found.append(f"{where}: {mod} ({src}) imports {target} ({dst}), a higher layer")
            elif level(dst, layers) == level(src, layers) and src in peers and dst in peers:
                found.append(f"{where}: {mod} ({src}) imports {target} ({dst}), another role")
    return found


def _prefixes(target: str) -> list[str]:
    parts = target.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts) + 1)]


def test_every_import_in_downpour_goes_downward():
    assert violations(ROOT) == []


def test_every_allowed_exception_is_still_needed():
    """An exception whose import is gone is removed from the list (it would hide a new one)."""
    imports = {(module_name(p, ROOT), t) for p in ROOT.rglob("*.py") for _, t in imports_of(p, ROOT)}
    stale = [k for k in ALLOWED if not any(m == k[0] and t.startswith(k[1]) for m, t in imports)]
    assert stale == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


_LAYERS = [{"errors"}, {"transport"}, {"protocol"}, {"server", "worker"}, {"cli"}]


def test_the_checker_passes_a_tree_whose_imports_go_downward(tmp_path):
    root = _tree(tmp_path, {
        "errors.py": "",
        "transport/__init__.py": "import zmq\nfrom pkg.errors import E\n",
        "protocol/codec.py": "from pkg.transport import Channel\n",
        "server/service.py": "from pkg.protocol.codec import decode\nfrom . import store\n",
        "server/store.py": "",
        "cli/main.py": "from pkg.server.service import run\nfrom pkg.worker import run_worker\n",
    })
    assert violations(root, _LAYERS, {"server", "worker"}, {}) == []


@pytest.mark.parametrize("bad, why", [
    ("protocol/codec.py", "a higher layer"),  # protocol importing a role
    ("worker/client.py", "another role"),  # a role importing another
    ("transport/shm.py", "a higher layer"),  # lazily, inside a function
])
def test_the_checker_fails_when_an_upward_import_is_added(tmp_path, bad, why):
    body = {"protocol/codec.py": "from pkg.server.service import run\n",
            "worker/client.py": "from pkg.server import store\n",
            "transport/shm.py": "def f():\n    from pkg.cli.main import main\n"}[bad]
    root = _tree(tmp_path, {"errors.py": "", "server/__init__.py": "", "server/service.py": "", "server/store.py": "",
                            "cli/main.py": "", bad: body})
    [found] = violations(root, _LAYERS, {"server", "worker"}, {})
    assert found.startswith(f"pkg/{bad}:") and why in found


def test_the_checker_keeps_zmq_inside_transport(tmp_path):
    root = _tree(tmp_path, {"errors.py": "", "server/service.py": "import zmq\n"})
    [found] = violations(root, _LAYERS, set(), {})
    assert "only pkg/transport/ may" in found
