"""launcher/cluster/shell.py: every value quoted so bash (or sbatch) reads back exactly that value."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cluster"))
from helpers import sbatch_argument

from launcher.cluster import shell
from launcher.config.errors import ConfigError

# Values that break naive shell text: spaces, quotes, substitutions, separators, globs,
# unicode, leading dashes, percent signs, tabs, backslashes and (for bash) newlines.
HOSTILE = [
    "plain", "two words", "it's", 'say "hi"', "$(touch /tmp/ftl-pwned)", "`id`", "${HOME}", "$HOME",
    "a;b", "a && b", "a || b", "a|b", "*", "?", "[ab]", "~", "!x", "x#y", "#start", "--flag", "-n",
    "é ü 中文 🚀", "tab\there", "back\\slash", "100%", "%j", "a=b", "(x)", "{a,b}", "<in >out", "",
    "'", '"', "\\", "'\"'\"'",
]
MULTILINE = ["line1\nline2", "cr\rhere", "trailing\n"]


@pytest.mark.parametrize("value", HOSTILE + MULTILINE)
def test_quote_round_trips_through_shlex_and_bash(value):
    word = shell.quote(value)
    assert shlex.split(word) == [value]
    out = subprocess.run(["bash", "-c", f"printf '%s' {word}"], capture_output=True, timeout=30)
    assert out.stdout.decode() == value


@pytest.mark.parametrize("value", HOSTILE)
def test_sbatch_value_round_trips_through_sbatch_parsing(value):
    line = shell.sbatch_line("--comment", value, "cluster.sbatch_extra[0]")
    assert line.startswith("#SBATCH --comment=")
    arg, rest = sbatch_argument(line[len("#SBATCH"):])
    assert arg == f"--comment={value}"
    assert sbatch_argument(rest) == (None, "")


def test_plain_sbatch_values_stay_unquoted():
    assert shell.sbatch_line("--time", "24:00:00", "cluster.time") == "#SBATCH --time=24:00:00"
    assert shell.sbatch_line("--output", "/r/logs/job-%j.out", "output.dir") == \
        "#SBATCH --output=/r/logs/job-%j.out"
    assert shell.sbatch_line("--exclusive", None, "cluster.exclusive") == "#SBATCH --exclusive"


@pytest.mark.parametrize("value", MULTILINE)
def test_line_breaks_in_sbatch_values_are_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"cluster\.partition.*line break"):
        shell.sbatch_line("--partition", value, "cluster.partition")


def test_nul_is_refused_everywhere_naming_the_key():
    with pytest.raises(ConfigError, match=r"cluster\.env\.X.*NUL"):
        shell.export("X", "a\0b", "cluster.env.X")
    with pytest.raises(ConfigError, match=r"cluster\.python.*NUL"):
        shell.quote("py\0thon", "cluster.python")
    with pytest.raises(ConfigError, match=r"cluster\.setup\[0\].*NUL"):
        shell.quote(shell.Raw("echo \0"), "cluster.setup[0]")


def test_sbatch_option_names_are_checked():
    with pytest.raises(ConfigError, match=r"cluster\.sbatch_extra\[2\].*not an sbatch long option"):
        shell.sbatch_line("-N", "2", "cluster.sbatch_extra[2]")
    with pytest.raises(ConfigError, match=r"not an sbatch long option"):
        shell.sbatch_line("--comment=x #SBATCH --nodes", "1", "k")


def test_raw_is_inserted_as_written_and_everything_else_is_quoted():
    raw = shell.Raw('source "$HOME/.venv/bin/activate" && module load cuda')
    assert shell.quote(raw) == raw
    assert shell.join(["python", shell.Raw('"$X"'), "a b"]) == "python \"$X\" 'a b'"
    assert shell.quote(8) == "8"
    with pytest.raises(TypeError, match="booleans"):
        shell.quote(True)


@pytest.mark.parametrize("value", HOSTILE + MULTILINE)
def test_export_sets_exactly_the_value(value):
    line = shell.export("FTL_TEST_VALUE", value, "cluster.env.FTL_TEST_VALUE")
    out = subprocess.run(["bash", "-c", f"{line}\nprintf '%s' \"$FTL_TEST_VALUE\""],
                         capture_output=True, timeout=30)
    assert out.stdout.decode() == value


@pytest.mark.parametrize("name", ["1X", "A-B", "A B", "", "X;rm", "$X"])
def test_export_refuses_bad_names(name):
    with pytest.raises(ConfigError, match="not a valid environment variable name"):
        shell.export(name, "v", f"cluster.env.{name}")


@pytest.mark.parametrize("text", ["a\nrm -rf /", "x\r\ny", "nul\0", "\x1b[31mred"])
def test_comment_text_never_leaves_the_comment(text):
    out = shell.comment(text)
    assert "\n" not in out and "\r" not in out and "\0" not in out and "\x1b" not in out
    script = f"# {out}\necho ok"
    assert subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          timeout=30).stdout == "ok\n"


def test_slurm_filename_keeps_percent_literal_and_refuses_backslash():
    assert shell.slurm_filename("/runs/100%/logs", "output.dir") == "/runs/100%%/logs"
    with pytest.raises(ConfigError, match=r"output\.dir.*backslash"):
        shell.slurm_filename("/runs/a\\b", "output.dir")
    with pytest.raises(ConfigError, match=r"output\.dir.*line break"):
        shell.slurm_filename("/runs/a\nb", "output.dir")
