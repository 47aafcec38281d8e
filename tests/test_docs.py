"""The front door: README stays a front page whose Python runs verbatim, and docs/ builds strictly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def test_docs_build_strictly(tmp_path):
    # --strict turns every warning into a failure: a link to a missing page or anchor, a page
    # left out of the nav (mkdocs.yml's validation settings), a broken picture.
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "site" / "bad-input" / "index.html").is_file()


def test_every_docs_page_is_in_the_nav():
    nav = set(re.findall(r"^\s*- [^:\n]+: (\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages == nav, f"not in the nav: {sorted(pages - nav)}; in the nav but missing: {sorted(nav - pages)}"


def test_readme_is_a_front_page_that_keeps_the_ci_test_command():
    text = README.read_text()
    assert len(text.splitlines()) <= 220
    # CI (.ci/run) runs README's test command: it must stay in a fenced block of the Development section.
    development = text.split("\n## Development\n", 1)[1].split("\n## ", 1)[0]
    commands = [line.split("#")[0].strip() for block in _fenced_blocks(development, "bash") for line in block.splitlines()]
    assert "python -m pytest -q" in commands
    ci_commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci_commands[-1] == "python -m pytest -q"


def test_readme_links_to_files_that_exist():
    prose = re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", README.read_text(), flags=re.S | re.M))  # not code
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)", prose) if "://" not in t]
    assert targets and all((ROOT / t).exists() for t in targets), [t for t in targets if not (ROOT / t).exists()]


def test_docs_pages_named_in_code_and_scripts_exist():
    # A docstring or a script's comment that sends the reader to docs/ must name a page that is there.
    sources = [*(ROOT / "capcli").rglob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "weights").glob("*.py"),
               *(ROOT / "weights").glob("*.sh"), *(ROOT / "examples").rglob("*.py")]
    named = {(source.relative_to(ROOT), page) for source in sources
             for page in re.findall(r"docs/[\w-]+\.md", source.read_text())}
    assert named and all((ROOT / page).is_file() for _, page in named), \
        sorted(f"{source}: {page}" for source, page in named if not (ROOT / page).is_file())


def test_the_python_examples_run_verbatim():
    # README's block and the API page's, each in a fresh namespace, in one process (torch loads once).
    blocks = _fenced_blocks(README.read_text(), "python") + _fenced_blocks((DOCS / "captioning.md").read_text(), "python")
    assert len(blocks) == 2
    runner = "import sys\nfor code in sys.argv[1:]:\n    exec(compile(code, 'example', 'exec'), {'__name__': '__main__'})\n"
    env = {k: v for k, v in os.environ.items() if k != "CAPCLI_MODEL"}
    run = subprocess.run([sys.executable, "-c", runner, *blocks], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "a black dog is playing in the water"
    assert "examples/climber.jpg a man is climbing a rock wall" in run.stdout


@pytest.mark.parametrize("picture", sorted(p.name for p in DOCS.glob("attention-*.png")))
def test_attention_pictures_are_in_the_current_format(picture):
    with Image.open(DOCS / picture) as image:
        chunks = dict(image.text)
    assert "capcli:words" not in chunks  # the format before capcli:caption/capcli:tokens
    tokens, caption = json.loads(chunks["capcli:tokens"]), chunks["capcli:caption"]
    assert tokens and caption in (" ".join(tokens), "".join(tokens))  # words, or characters / SMILES tokens


def test_every_docs_picture_has_the_command_that_made_it_next_to_it():
    pages = [p.read_text() for p in DOCS.glob("*.md")]
    for picture in DOCS.glob("*.png"):
        assert any(f"]({picture.name})" in page and f"docs/{picture.name}" in page for page in pages), picture.name
