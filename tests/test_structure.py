"""The package's shape: folders by concern, no import circles, launchers above the worker library,
one worker entry for every launcher, small modules and folders, a README a user reads."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PKG = REPO / "dist_embed"
ENTRY_POINTS = {"dist_embed.cli", "dist_embed.__main__"}  # the command line may start any launcher


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = ["dist_embed", *rel.parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every dist_embed module ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rsplit(".", 1)[0]
            mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_circles():
    g = graph()
    # a package's __init__ is imported with any of its modules; that edge is not a circle
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in g.items()}
    seen, stack, on_stack, cycles = {}, [], set(), []

    def visit(m):
        seen[m] = True
        stack.append(m)
        on_stack.add(m)
        for t in sorted(edges[m]):
            if t in on_stack:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in seen:
                visit(t)
        stack.pop()
        on_stack.discard(m)

    for m in sorted(edges):
        if m not in seen:
            visit(m)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_worker_library_never_imports_a_launcher():
    g = graph()
    offenders = {m: sorted(t for t in ts if t.startswith("dist_embed.launch")) for m, ts in g.items()
                 if not m.startswith("dist_embed.launch") and m not in ENTRY_POINTS}
    assert not {m: t for m, t in offenders.items() if t}


def test_launchers_are_a_real_subpackage_without_links():
    assert not any(p.is_symlink() for p in PKG.rglob("*")), "links inside the package"
    assert {p.stem for p in (PKG / "launch").glob("*.py")} >= {"local", "slurm", "ray"}
    assert (PKG / "launch" / "train.sbatch").is_file()
    assert not (REPO / "launch").exists()


def test_every_launcher_starts_the_one_worker_entry():
    """--nproc and srun start ``dist-embed train`` (cli -> engine.worker.run_worker), Ray calls
    run_worker in its workers; nothing outside the worker entry calls the training itself."""
    g = graph()
    assert "dist_embed.engine.worker" in g["dist_embed.cli"] and "dist_embed.engine.worker" in g["dist_embed.launch.ray"]
    assert "dist_embed.cli" in (PKG / "launch" / "local.py").read_text()
    assert "$DIST_EMBED train" in (PKG / "launch" / "train.sbatch").read_text()
    callers = {m for m, ts in g.items() if "dist_embed.engine.loop" in ts}
    assert callers <= {"dist_embed.engine.worker"}, callers


def test_no_module_is_a_god_module():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert max(sizes.values()) <= 400, {k: v for k, v in sizes.items() if v > 400}


def test_folders_are_small_and_say_what_they_own():
    for folder in [PKG, *(p for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__")]:
        mods = [p for p in folder.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
        assert len(mods) <= 12, (folder, len(mods))
        init = folder / "__init__.py"
        assert init.is_file(), folder
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()) <= 3, (folder, doc)


def test_the_readme_is_a_users_guide():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300, len(lines)
    for heading in ("## The two commands", "## Using it", "## Run on a cluster", "## Monitoring",
                    "## When things go wrong", "## Performance"):
        assert heading in lines, heading
