"""Every measured figure has one home, docs/results.md or docs/benchmarks.md, with its command, commit, machine and
load (issue #35). The README, the configs' comments and the other documents may quote one only as it is written
there: a figure changed in one place and not the other fails here, instead of reaching a reader."""

import re
from pathlib import Path

import pytest

from conftest import REPO

HOMES = ("docs/results.md", "docs/benchmarks.md")
QUOTING = sorted({*REPO.glob("configs/*.yaml"), REPO / "README.md", *REPO.glob("docs/*.md")} -
                 {REPO / home for home in HOMES})
# A measurement as these documents write one: a number with its unit (a mean may carry its ± spread), or a ratio.
FIGURE = re.compile(r"(?<![\w.-])\d[\d,]*(?:\.\d+)?(?: ± \d+(?:\.\d+)?)?"
                    r"(?:%| ?(?:s|ms|min|minutes|samples/s|points|MFLOP|GB)\b|×(?!\d))")  # not 28×28: a size
# Numbers with units that are settings, bounds or facts of the job, not measurements.
NOT_MEASURED = {
    "300 s",  # dist.timeout_s's default
    "30 s",  # the local cluster's SlurmdTimeout; torchrun's --shutdown-timeout
    "5.7 GB",  # the CUDA venv's size, pip's own report
    "99.5%",  # a tick of report's log-scale axis
    "120 s",  # the fuzz's alarm for a call that hangs
    "20 minutes",  # CI's time limit
}


def figures(text: str) -> list[str]:
    return [figure for figure in FIGURE.findall(text) if figure not in NOT_MEASURED]


def strays(text: str) -> list[str]:
    """The figures of `text` that neither home holds as written."""
    homes = " ".join((REPO / home).read_text() for home in HOMES)
    return [figure for figure in figures(text) if figure not in homes]


@pytest.mark.parametrize("path", QUOTING, ids=lambda path: str(path.relative_to(REPO)))
def test_every_figure_quoted_outside_its_home_is_written_there_as_it_is_here(path):
    assert not strays(path.read_text()), f"{path.name} quotes figures that neither home holds: {strays(path.read_text())}"


def test_the_check_reads_figures_as_the_documents_write_them():
    quoted = "the default trains in 204 s and scores 99.67 ± 0.04%, 1.68× `fast`'s time, on 28×28 images"
    assert figures(quoted) == ["204 s", "99.67 ± 0.04%", "1.68×"]


def test_a_figure_of_the_readme_changed_by_hand_fails_the_check():
    text = (REPO / "README.md").read_text()
    assert figures(text), "the README quotes no figure: this check would check nothing"
    for figure in figures(text):
        changed = re.sub(r"\d(?=\D*$)", lambda digit: str((int(digit.group()) + 1) % 10), figure)  # its last digit
        if not strays(changed):  # the changed one happens to be another figure of a home: try the next
            continue
        assert strays(text.replace(figure, changed)) == [changed] * text.count(figure)
        return
    pytest.fail("every figure of the README, changed by one in its last digit, is still a figure of a home")
