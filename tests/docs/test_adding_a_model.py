"""Runs every code block of docs/adding_a_model.md, in order, in an empty folder: `python file=NAME` blocks are
written to NAME, `python run` blocks executed (sharing one namespace), `python excerpt=PATH` blocks must match
lmforge's source at PATH line for line, `bash` blocks are `lmforge` commands that must exit 0, `text` blocks
are sample output. A block of any other kind fails the test, so no snippet goes untested."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shlex
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUIDE = os.path.join(REPO, "docs", "adding_a_model.md")
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)


def _blocks() -> list[tuple[str, str, str]]:
    with open(GUIDE) as f:
        return [(lang, info.strip(), code) for lang, info, code in BLOCK.findall(f.read())]


def _stripped_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines()]


def _contains(haystack: list[str], needle: list[str]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def _run_test_module(path: str) -> int:
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ran = 0
    for name, func in inspect.getmembers(module, inspect.isfunction):
        if not name.startswith("test_"):
            continue
        marks = [m for m in getattr(func, "pytestmark", []) if m.name == "parametrize"]
        values = marks[0].args[1] if marks else [None]
        for value in values:
            func(value) if marks else func()
            ran += 1
    return ran


def test_guide_blocks_are_all_of_a_tested_kind():
    kinds = {(lang, info.split("=")[0]) for lang, info, _ in _blocks()}
    assert kinds <= {("python", "file"), ("python", "run"), ("python", "excerpt"), ("bash", ""), ("text", "")}
    assert ("python", "file") in kinds and ("bash", "") in kinds


def test_every_snippet_of_the_guide_runs(tmp_path, monkeypatch, capsys):
    from lmforge.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {"__name__": "adding_a_model_guide"}
    written_tests = []
    try:
        for lang, info, code in _blocks():
            if lang == "python" and info.startswith("file="):
                name = info.split("=", 1)[1]
                (tmp_path / name).write_text(code)
                if name == "my_qwen3.py":  # the guide shows the real model file, not a copy that drifts
                    with open(os.path.join(REPO, "lmforge", "models", "qwen3.py")) as f:
                        assert code == f.read(), "docs/adding_a_model.md must show lmforge/models/qwen3.py verbatim"
                if name.startswith("test_"):
                    written_tests.append(str(tmp_path / name))
            elif lang == "python" and info == "run":
                exec(compile(code, f"{GUIDE}:run", "exec"), namespace)
            elif lang == "python" and info.startswith("excerpt="):
                with open(os.path.join(REPO, info.split("=", 1)[1])) as f:
                    source = f.read()
                assert _contains(_stripped_lines(source), _stripped_lines(code)), f"excerpt not in {info}"
            elif lang == "bash":
                for line in code.strip().splitlines():
                    argv = shlex.split(line)
                    assert argv[0] == "lmforge", line
                    assert main(argv[1:]) == 0, f"`{line}` failed:\n{capsys.readouterr()}"
        assert sum(_run_test_module(path) for path in written_tests) == 3
    finally:
        for name in ("my_qwen3", "test_my_qwen3", "my_neox"):
            sys.modules.pop(name, None)
    out = capsys.readouterr().out
    assert "PASS: max|diff|" in out and "FAIL" not in out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
