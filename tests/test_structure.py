"""The package's shape: folders by concern, no import circles, launchers above the worker library,
one worker entry for every launcher, small modules and folders, a README a user reads."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PKG = REPO / "dist_embed"
LAUNCH = REPO / "launch"


def modules() -> dict[str, Path]:
    """Every module of the worker library (dist_embed) and of the launchers above it (launch)."""
    out = {}
    for root in (PKG, LAUNCH):
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [root.name, *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every dist_embed or launch module ``name`` imports, at module level or inside functions."""
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
    offenders = {m: sorted(t for t in ts if t.split(".")[0] == "launch") for m, ts in g.items()
                 if m.startswith("dist_embed")}
    assert not {m: t for m, t in offenders.items() if t}


def test_packages_import_in_one_direction():
    """No two packages of the worker library import each other (a module may import its own
    package's modules; ``dist_embed.X`` top-level modules count as packages of one)."""
    def package(m: str) -> str:
        parts = m.split(".")
        return ".".join(parts[:2])

    edges = {}
    for m, ts in graph().items():
        if m.startswith("dist_embed."):
            for t in ts:
                if t.startswith("dist_embed.") and package(t) != package(m):
                    edges.setdefault(package(m), set()).add(package(t))
    both = sorted({tuple(sorted((a, b))) for a, bs in edges.items() for b in bs if a in edges.get(b, ())})
    assert not both, both


def test_launchers_are_a_top_level_package_beside_the_library():
    assert not any(p.is_symlink() for root in (PKG, LAUNCH, REPO / "slurm") for p in root.rglob("*")), "links"
    assert {p.stem for p in LAUNCH.glob("*.py")} >= {"cli", "local", "slurm", "ray"}
    assert not (PKG / "launch").exists()
    # the batch script users copy and the template ``submit slurm`` renders are the same file's bytes
    assert (REPO / "slurm" / "train.sbatch").read_bytes() == (LAUNCH / "train.sbatch").read_bytes()


def test_every_launcher_starts_the_one_worker_entry():
    """--nproc and srun start ``dist-embed train`` (cli -> engine.worker.run_worker), Ray calls
    run_worker in its workers; nothing outside the worker entry calls the training itself."""
    g = graph()
    assert "dist_embed.engine.worker" in g["dist_embed.commands"] and "dist_embed.engine.worker" in g["launch.ray"]
    assert "dist_embed.commands" in g["launch.cli"]  # the user's command runs train/mine through the worker side
    assert '"-m", "dist_embed"' in (LAUNCH / "local.py").read_text()  # workers: python -m dist_embed train
    assert "$DIST_EMBED train" in (LAUNCH / "train.sbatch").read_text()
    callers = {m for m, ts in g.items() if "dist_embed.engine.loop" in ts}
    assert callers <= {"dist_embed.engine.worker"}, callers


def test_no_module_is_a_god_module():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert max(sizes.values()) <= 400, {k: v for k, v in sizes.items() if v > 400}


def test_lines_fit_in_120_characters():
    """Modules stay small by splitting where the concern splits, never by squeezing lines."""
    long = {f"{path.relative_to(REPO)}:{i}": len(line) for path in modules().values()
            for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 120}
    assert not long, long


def test_folders_are_small_and_say_what_they_own():
    for folder in [PKG, LAUNCH, *(p for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__")]:
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
