"""README.md and docs/: every module, config, path and link they name exists, and the README stays short.

Text checks only (no torch, no subprocess): a file moved or renamed without its documentation fails here
instead of in a newcomer's shell. Checked: each line of the ```sh blocks (backslash continuations joined)
and each inline `code` span of the prose."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
# The one command that starts the local cluster, as the README, slurm/local/README.md and the skip
# message of the SLURM tests give it.
SLURM_SETUP = "MNIST_ADD_SLURM_NODES=2 bash slurm/local/start.sh && . slurm/local/env.sh"
# What `python -m` may run that is not a file of this repository.
OTHER_MODULES = {"pytest", "venv", "pip", "torch.distributed.run"}
PATH_PREFIXES = ("configs", "slurm", "bench", "tests", "mnist_add", "job", "docs")

SH_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.DOTALL | re.MULTILINE)
ANY_BLOCK = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`([^`]+)`")
PYTHON_MODULE = re.compile(r"\bpython3?\s+-m\s+([\w.]+)")
TORCHRUN_MODULE = re.compile(r"\s-m\s+([\w.]+)")
CONFIG = re.compile(r"--config[ =]+([^\s`'\"]+)")
# A path token starts at one of the prefixes, not inside another word or path (/tmp/mnist-add-slurm, runs/job/).
REPO_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*)" % "|".join(PATH_PREFIXES))
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "slurm" / "local" / "README.md"]


def sh_commands(text: str) -> list[str]:
    """The lines of every ```sh block, continuations joined, comments dropped."""
    commands = []
    for block in SH_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            if line:
                commands.append(line)
    return commands


def code_snippets(text: str) -> list[str]:
    """Every sh command and every inline code span outside fenced blocks."""
    return sh_commands(text) + INLINE_CODE.findall(ANY_BLOCK.sub("", text))


def missing_modules(text: str) -> list[str]:
    missing = []
    for snippet in code_snippets(text):
        modules = PYTHON_MODULE.findall(snippet)
        if "torchrun" in snippet:
            modules += TORCHRUN_MODULE.findall(snippet)
        for module in modules:
            base = REPO.joinpath(*module.split("."))
            found = base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
            if not found and module not in OTHER_MODULES:
                missing.append(f"python -m {module}")
    return missing


def missing_names(text: str, pattern: re.Pattern, exists, shown=lambda name: name) -> list[str]:
    """Every name `pattern` finds in the code of `text` that `exists` does not, as `shown` writes it."""
    names = (name for snippet in code_snippets(text) for name in pattern.findall(snippet))
    return [shown(name) for name in names if not exists(name)]


def config_exists(name: str) -> bool:
    name = name.rstrip(".,;:)")
    candidates = [REPO / name] if "/" in name else [REPO / "configs" / name, REPO / "configs" / f"{name}.yaml"]
    return any(path.is_file() for path in candidates)


def missing_configs(text: str) -> list[str]:
    return missing_names(text, CONFIG, config_exists, lambda name: f"--config {name.rstrip('.,;:)')}")


def missing_paths(text: str) -> list[str]:
    return missing_names(text, REPO_PATH, lambda token: (REPO / token.rstrip(".")).exists(),
                         lambda token: token.rstrip("."))


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in HEADING.findall(ANY_BLOCK.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def broken_links(doc: Path, text: str) -> list[str]:
    broken = []
    for target in LINK.findall(ANY_BLOCK.sub("", text)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in github_anchors(path.read_text()):
            broken.append(target)
    return broken


@pytest.fixture(params=documents(), ids=lambda path: str(path.relative_to(REPO)))
def document(request) -> tuple[Path, str]:
    return request.param, request.param.read_text()


def test_the_readme_fits_in_200_lines():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_the_docs_folder_holds_the_documents_the_readme_links():
    assert {path.name for path in (REPO / "docs").glob("*.md")} >= {
        "configuration.md", "distributed.md", "results.md", "benchmarks.md", "development.md"}


def test_every_python_module_a_command_runs_exists(document):
    assert missing_modules(document[1]) == []


def test_every_config_a_command_names_exists(document):
    assert missing_configs(document[1]) == []


def test_every_repository_path_named_in_code_exists(document):
    assert missing_paths(document[1]) == []


def test_every_relative_link_and_anchor_resolves(document):
    assert broken_links(*document) == []


def test_no_command_reads_the_development_machines_data_folder(document):
    """../shared/data exists only on the development machine: commands say /path/to/data instead."""
    assert [command for command in sh_commands(document[1]) if "../shared" in command] == []


def test_the_slurm_setup_command_is_the_same_everywhere():
    for path in ("README.md", "slurm/local/README.md", "docs/development.md", "docs/distributed.md",
                 "tests/test_slurm.py"):
        assert SLURM_SETUP in (REPO / path).read_text(), path


def test_the_checks_find_a_missing_module_config_path_and_link(tmp_path):
    """The checks themselves: each fake name is reported, and each real one is not."""
    doc = tmp_path / "fake.md"
    doc.write_text(
        "# Fake doc\n\n"
        "```sh\n"
        "python -m mnist_add.train --config fast   # real\n"
        "python -m mnist_add.trian --config fsat \\\n"
        "    bench/no_such_bench.py\n"
        "torchrun --nproc_per_node=2 -m job.sbumit\n"
        "```\n\n"
        "Prose with `python -m job.submit`, `configs/nope.yaml` and `tests/test_data.py`; "
        "links [a](#fake-doc), [b](#no-heading), [c](no_such.md) and [d](https://example.com/x).\n")
    text = doc.read_text()
    assert missing_modules(text) == ["python -m mnist_add.trian", "python -m job.sbumit"]
    assert missing_configs(text) == ["--config fsat"]
    assert missing_paths(text) == ["bench/no_such_bench.py", "configs/nope.yaml"]
    assert broken_links(doc, text) == ["#no-heading", "no_such.md"]
