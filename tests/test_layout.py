"""The project's import layout (via scripts/import_graph.py), and that analyzer's own behaviour on
tiny synthetic trees. Fast, no Ray."""

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_analyzer():
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up there
    spec.loader.exec_module(module)
    return module


import_graph = _load_analyzer()


@pytest.fixture(scope="module")
def real_tree():
    return import_graph.analyze(REPO)


def test_real_tree_has_no_import_cycles(real_tree):
    if real_tree.cycles:
        pytest.fail("module-level import cycles:\n" + "\n".join("  " + ", ".join(c) for c in real_tree.cycles))


def test_real_tree_library_does_not_import_actors(real_tree):
    if real_tree.actors_from_library:
        pytest.fail(
            f"pipeline library modules (drivers {sorted(import_graph.DRIVERS)} excepted) importing actors:\n"
            + "\n".join(f"  {src}:{lineno} -> {dst}" for src, dst, lineno in real_tree.actors_from_library)
        )


def test_real_tree_has_no_function_level_project_imports(real_tree):
    # Function-level imports are only for optional heavy third-party dependencies.
    if real_tree.function_level:
        pytest.fail("function-level imports of project modules:\n" + "\n".join(
            f"  {src}:{lineno} -> {dst}" for src, dst, lineno, _ in real_tree.function_level
        ))


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """Write {relative path: source} under root, with empty __init__.py for both packages."""
    for package in ("pipeline", "actors"):
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").touch()
    for relpath, source in files.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root


def test_module_names_and_longest_file(tmp_path):
    report = import_graph.analyze(write_tree(tmp_path, {
        "pipeline/sub/__init__.py": "",
        "pipeline/sub/deep.py": "a = 1\nb = 2\nc = 3\n",
        "actors/x.py": "x = 1\n",
        "tests/test_big.py": "\n" * 100,
    }))
    assert report.modules == ["actors", "actors.x", "pipeline", "pipeline.sub", "pipeline.sub.deep"]
    assert report.longest_file == ("pipeline/sub/deep.py", 3)


def test_two_module_cycle_detected(tmp_path):
    report = import_graph.analyze(write_tree(tmp_path, {
        "pipeline/a.py": "import pipeline.b\n",
        "pipeline/b.py": """\
            try:
                from pipeline.a import thing
            except ImportError:
                pass
            """,
        "pipeline/c.py": "from pipeline import a\n",
    }))
    assert report.cycles == [["pipeline.a", "pipeline.b"]]
    assert report.cycle_count == 1
    assert ("pipeline.c", "pipeline.a") in report.edges


def test_class_body_import_is_module_level_and_main_guard_is_not(tmp_path):
    report = import_graph.analyze(write_tree(tmp_path, {
        "pipeline/a.py": """\
            class Holder:
                from pipeline import b
            if __name__ == "__main__":
                from pipeline.a import main
            """,
        "pipeline/b.py": "",
    }))
    assert report.edges == {("pipeline.a", "pipeline.b")}
    assert report.cycles == [] and report.function_level == []


def test_function_level_import_detected_with_its_comment(tmp_path):
    report = import_graph.analyze(write_tree(tmp_path, {
        "pipeline/a.py": """\
            def load():
                import vllm  # optional heavy dependency: vLLM
                if True:
                    from pipeline import b  # lazy on purpose
                from pipeline.b import helper
            """,
        "pipeline/b.py": "",
    }))
    assert report.function_level == [
        ("pipeline.a", "pipeline.b", 4, "lazy on purpose"),
        ("pipeline.a", "pipeline.b", 5, ""),
    ]
    assert report.edges == set()


def test_relative_imports_resolved(tmp_path):
    report = import_graph.analyze(write_tree(tmp_path, {
        "pipeline/sub/__init__.py": "from . import leaf\n",
        "pipeline/sub/leaf.py": "from .sibling import name\nfrom .. import top\n",
        "pipeline/sub/sibling.py": "",
        "pipeline/top.py": "",
    }))
    assert report.edges == {
        ("pipeline.sub", "pipeline.sub.leaf"),
        ("pipeline.sub.leaf", "pipeline.sub.sibling"),
        ("pipeline.sub.leaf", "pipeline.top"),
    }


def test_type_checking_import_ignored(tmp_path):
    report = import_graph.analyze(write_tree(tmp_path, {
        "pipeline/a.py": """\
            import typing
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from pipeline.b import B
            if typing.TYPE_CHECKING:
                from actors import x
            """,
        "pipeline/b.py": "from pipeline.a import A\n",
        "actors/x.py": "",
    }))
    assert report.edges == {("pipeline.b", "pipeline.a")}
    assert report.cycles == [] and report.actors_from_library == []


def test_from_package_import_submodule_resolves_to_submodule(tmp_path):
    report = import_graph.analyze(write_tree(tmp_path, {
        "pipeline/a.py": "from pipeline import storage, CONSTANT\nimport json\n",
        "pipeline/storage.py": "",
    }))
    assert report.edges == {("pipeline.a", "pipeline.storage"), ("pipeline.a", "pipeline")}


def test_actors_imports_from_library_but_not_drivers(tmp_path):
    report = import_graph.analyze(write_tree(tmp_path, {
        "pipeline/lib.py": "from actors.x import X\n\ndef f():\n    import actors.x\n",
        "pipeline/build.py": "from actors.x import X\n",
        "actors/x.py": "",
    }))
    assert "pipeline.build" in import_graph.DRIVERS
    assert report.actors_from_library == [("pipeline.lib", "actors.x", 1), ("pipeline.lib", "actors.x", 4)]
