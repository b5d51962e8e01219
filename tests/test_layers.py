"""The package's layers: every import runs down the flow foundation <- data <- model <- eval <- engine
<- tools <- commands (docs/DESIGN.md, "Layers"), and eval never imports engine."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fredfusion"

LAYER_OF = {
    "fredfusion": "foundation",
    "spec": "foundation",
    "files": "foundation",
    "draw": "foundation",
    "data": "data",
    "model": "model",
    "config": "config",
    "eval": "eval",
    "engine": "engine",
    "predict": "tools",
    "show": "tools",
    "export": "tools",
    "bench": "tools",
    "ablation": "tools",
    "commands": "commands",
    "cli": "commands",
    "seed_compat": "commands",
    "__main__": "commands",
}
ALLOWED = {
    "foundation": {"foundation"},
    "data": {"foundation", "data"},
    "model": {"foundation", "model"},
    "config": {"foundation", "config"},
    "eval": {"foundation", "data", "model", "eval"},
    "engine": {"foundation", "data", "model", "config", "eval", "engine"},
    "tools": {"foundation", "data", "model", "config", "eval", "engine", "tools"},
    "commands": set(LAYER_OF.values()),
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return LAYER_OF[parts[1] if len(parts) > 1 else parts[0]]


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fredfusion":
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "fredfusion")
    return names


def test_every_module_has_a_layer() -> None:
    for path in SRC.rglob("*.py"):
        _layer(_module_of(path))  # KeyError names a module outside the table


def test_imports_follow_the_layers() -> None:
    wrong = []
    for path in SRC.rglob("*.py"):
        own = _layer(_module_of(path))
        for name in _imports(path):
            if _layer(name) not in ALLOWED[own]:
                wrong.append(f"{_module_of(path)} ({own}) imports {name} ({_layer(name)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from fredfusion.engine.trainer import Trainer\n")
    assert _layer(next(iter(_imports(bad)))) not in ALLOWED["eval"]
