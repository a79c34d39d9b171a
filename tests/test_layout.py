"""The package's floors, read from the source: merge/ imports nothing of calibration/ or the jobs above it, and
the online reference reads time through the clock, never through the replay hook it is the reference for."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported(path: Path) -> set[str]:
    """Absolute `lorasched.` module names a file imports (relative imports resolved against its package)."""
    package = ["lorasched", *path.relative_to(ROOT).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.startswith("lorasched")}


def test_merge_imports_nothing_above_it():
    for path in (ROOT / "merge").rglob("*.py"):
        above = {n for n in imported(path) if n.startswith(("lorasched.calibration", "lorasched.convert",
                                                             "lorasched.cli"))}
        assert not above, f"{path.relative_to(ROOT)} imports {sorted(above)}"


def test_calibration_imports_no_job_and_the_online_reference_not_the_hook():
    for path in (ROOT / "calibration").glob("*.py"):
        above = {n for n in imported(path) if n.startswith(("lorasched.convert", "lorasched.cli",
                                                             "lorasched.evaluation", "lorasched.many"))}
        assert not above, f"{path.relative_to(ROOT)} imports {sorted(above)}"
    online = imported(ROOT / "calibration" / "online.py")
    assert "lorasched.merge.clock" in online and not any(n.startswith("lorasched.merge.replay") for n in online)


def test_evaluation_imports_no_job():
    for path in (ROOT / "evaluation").glob("*.py"):
        above = {n for n in imported(path) if n.startswith(("lorasched.convert", "lorasched.cli", "lorasched.many"))}
        assert not above, f"{path.relative_to(ROOT)} imports {sorted(above)}"


def test_the_command_line_loads_neither_the_calibration_stack_nor_pil():
    """`lorasched --help` (and a mistyped option) answers from the CLI module: the converter's denoising, embedding
    and image code load when a command runs."""
    code = ("import sys, lorasched.cli; print(' '.join(sorted(m for m in sys.modules if m.startswith(('PIL', "
            "'lorasched.calibration', 'lorasched.evaluation', 'transformers')))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == ["lorasched.calibration", "lorasched.calibration.embedders"], loaded


def test_the_replay_hook_imports_only_torch_safetensors_and_the_standard_library():
    """At module level, through every lorasched module it pulls in (deployers install no converter extras)."""
    allowed = {"torch", "safetensors", "json", "hashlib", "os", "struct", "tempfile", "math", "bisect", "functools",
               "dataclasses", "pathlib", "logging", "warnings", "contextlib", "typing", "weakref", "__future__"}
    seen, todo = set(), ["replay"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        body = ast.parse((ROOT / "merge" / f"{module}.py").read_text()).body
        third_party = {alias.name.split(".")[0] for node in body if isinstance(node, ast.Import)
                       for alias in node.names}
        third_party |= {node.module.split(".")[0] for node in body
                        if isinstance(node, ast.ImportFrom) and node.level == 0}
        assert third_party <= allowed, (module, third_party - allowed)
        todo += [node.module for node in body if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module]
        todo += [alias.name for node in body if isinstance(node, ast.ImportFrom) and node.level == 1
                 and not node.module for alias in node.names]
    assert "rules" not in seen and "export" not in seen and "lora_io" not in seen, seen


PACK_COPIES = {"comfyui-lorasched/schema.py": "merge/schema.py",
               "sd-webui-lorasched/lorasched_webui/schema.py": "merge/schema.py",
               "sd-webui-lorasched/lorasched_webui/patching.py": "comfyui-lorasched/patching.py"}


def test_the_packs_carry_the_one_reader_and_patcher_byte_for_byte():
    """The node pack and the WebUI extension install alone, so each carries copies made by `make packs`: the one
    file reader, and the ComfyUI-patcher replay the node and reForge share. A copy edited by hand, or a change
    not copied, fails here."""
    for copy, source in PACK_COPIES.items():
        assert (ROOT / copy).read_bytes() == (ROOT / source).read_bytes(), f"{copy} differs from {source}: make packs"


def test_the_schema_module_stands_alone():
    """No import of lorasched and no relative import: the copies must work where the package is not installed."""
    allowed = {"torch", "safetensors", "json", "hashlib", "os", "math", "bisect", "dataclasses", "typing",
               "__future__"}
    body = ast.parse((ROOT / "merge" / "schema.py").read_text()).body
    modules = {alias.name.split(".")[0] for node in body if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module.split(".")[0] for node in body if isinstance(node, ast.ImportFrom)}
    assert all(node.level == 0 for node in body if isinstance(node, ast.ImportFrom)) and modules <= allowed, modules


PACKAGE_SOURCES = [path for path in ROOT.rglob("*.py")
                   if path.relative_to(ROOT).parts[0] not in ("tests", "benchmarks", "docs", "comfyui-lorasched",
                                                               "sd-webui-lorasched", "build")
                   and not path.relative_to(ROOT).parts[0].startswith(".")]


def _method_tests(source: str, label: str, names: set[str]) -> list[str]:
    """Comparisons with a method name string, and isinstance checks against a `…Rule` class, in source code."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                if any(isinstance(value, ast.Constant) and value.value in names for value in values):
                    found.append(f"{label}:{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            if any((kind.attr if isinstance(kind, ast.Attribute) else getattr(kind, "id", "")).endswith("Rule")
                   for kind in kinds):
                found.append(f"{label}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_outside_the_registry_names_a_method_or_checks_a_rule_class():
    """A method is resolved once into its `Method` (merge/rules): nothing else compares a name with one or asks
    which rule class it holds."""
    from lorasched.merge import rules

    assert len(PACKAGE_SOURCES) > 30
    outside = [path for path in PACKAGE_SOURCES if path.parent != ROOT / "merge" / "rules"]
    found = [hit for path in outside
             for hit in _method_tests(path.read_text(), str(path.relative_to(ROOT)), set(rules.names()))]
    assert not found, "\n".join(found)


def test_the_scan_finds_what_it_looks_for():
    source = "if method == 'klora' or m in ('x', 'est'):\n    pass\nok = isinstance(rule, (int, FeatureKLRule))\n"
    assert len(_method_tests(source, "probe", {"klora", "est"})) == 3
