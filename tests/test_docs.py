"""The README and the docs site stay true to the code: commands exist, numbers come from results pages, the
generated methods reference lists every method, and no text says who measured what when.

The strict site build itself (broken links, missing pages) runs in ``make docs``, which ``make test`` runs.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
RESULTS = sorted(p for p in (DOCS / "results").glob("*.md") if p.name not in ("index.md", "drift.md"))


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _hooks():
    spec = importlib.util.spec_from_file_location("macq_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_every_script_named_in_the_docs_exists():
    named = set()
    for path in _markdown_files():
        named |= set(re.findall(r"scripts/[\w/]+\.(?:py|sh)", path.read_text(encoding="utf-8")))
    assert named, "no script named at all: the pattern is wrong"
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, missing


def test_every_macq_command_in_the_docs_exists():
    from typer.main import get_command

    from macq.cli import app

    commands = set(get_command(app).commands)
    used = set()
    for path in _markdown_files():
        text = path.read_text(encoding="utf-8")
        spans = re.findall(r"```.*?```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text)
        for span in spans:
            used |= set(re.findall(r"(?:^|[\s`(;|&])macq ([a-z][a-z-]*)", span, flags=re.M))
    assert {"export", "quantize", "eval"} <= used, used
    assert used <= commands, sorted(used - commands)


@pytest.mark.parametrize("page", RESULTS, ids=lambda p: p.name)
def test_results_page_states_command_date_commit_machine(page):
    text = page.read_text(encoding="utf-8")
    box = re.search(r'!!! info "How these tables were made"\n((?:    .*\n|\n)+)', text)
    assert box, f"{page.name}: no 'How these tables were made' box"
    body = box.group(1)
    for field in ("**Regenerate:**", "**Measured:**", "**Machine:**"):
        assert field in body, f"{page.name}: {field} missing"
    measured = body.split("**Measured:**", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"\b20\d\d-\d\d-\d\d\b", measured), f"{page.name}: no date"
    assert re.search(r"\bcommits? [0-9a-f]{7,40}\b", measured), f"{page.name}: no commit"


def test_readme_numbers_come_from_results_pages():
    """Every decimal number in the README appears on a results page (which names its command)."""
    readme = README.read_text(encoding="utf-8")
    results = "\n".join(p.read_text(encoding="utf-8") for p in RESULTS)
    numbers = set(re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", readme))
    assert len(numbers) > 20, numbers
    missing = sorted(n for n in numbers if n not in results)
    assert not missing, missing


def test_methods_reference_lists_every_method_and_option():
    from macq.options import CLI_FIELDS, method_options
    from macq.quantizers import METHODS

    text = _hooks().methods_markdown()
    for name in METHODS:
        assert f"## `{name}` {{#{name}}}" in text, name
    for opt in method_options().values():
        if opt.name not in CLI_FIELDS:
            assert f"`{opt.flag}`" in text, opt.flag
    assert "<!-- macq:methods -->" in (DOCS / "reference" / "methods.md").read_text(encoding="utf-8")


FORBIDDEN = re.compile(r"\bissue \d+|\b(this|previous|last|earlier|next|a later) session\b", re.I)


def test_no_issue_numbers_or_session_talk():
    files = _markdown_files()
    for package in ("macq", "converters", "mlx_backend", "scripts"):
        files += [p for p in (ROOT / package).rglob("*") if p.suffix in (".py", ".sh", ".md")
                  and "corpora" not in p.parts]
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if FORBIDDEN.search(line)]
    assert not hits, "\n".join(hits)


def _bench():
    spec = importlib.util.spec_from_file_location("macq_bench_harness", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_harness_covers_every_benchmark_and_page():
    bench = _bench()
    modules = {p.stem for p in (ROOT / "scripts" / "benchmarks").iterdir() if p.suffix in (".py", ".sh")}
    assert modules == set(bench.STUDIES) | set(bench.HELPERS), modules ^ (set(bench.STUDIES) | set(bench.HELPERS))
    for name, (page, _) in bench.STUDIES.items():
        assert (DOCS / "results" / page).resolve().is_file(), (name, page)
    used = set()
    for path in _markdown_files():
        used |= set(re.findall(r"scripts/bench\.py ([a-z0-9_-]+)", path.read_text(encoding="utf-8")))
    used.discard("--list")
    assert used and used <= set(bench.STUDIES) | set(bench.HELPERS), sorted(used - set(bench.STUDIES))
    # scripts/ holds the harness and the set-up / lock tools, nothing else
    top = {p.name for p in (ROOT / "scripts").iterdir() if p.is_file()}
    assert top == {"bench.py", "setup.sh", "check_lock.py", "format_lock.py", "drift.sh", "setup_reference_venv.sh"}, top


def test_bench_harness_dispatches_and_refuses_unknown(capsys):
    import subprocess
    import sys

    bench = _bench()
    assert bench.main(["no_such_study"]) == 2
    assert "unknown sub-command 'no_such_study'" in capsys.readouterr().err
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "make-shapes", "--list"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "llama-3.1-8b" in out.stdout


def test_module_paths_named_in_the_docs_exist():
    placeholders = {"macq/X.py", "macq/quantizers/mymethod.py"}   # the how-to-add examples in architecture.md
    named = set()
    for path in _markdown_files():
        named |= set(re.findall(r"\b(?:macq|converters|mlx_backend|tests)/[\w/]+\.py", path.read_text(encoding="utf-8")))
    assert len(named) > 20, named
    missing = sorted(n for n in named - placeholders if not (ROOT / n).is_file())
    assert not missing, missing
