"""Every command the README prints parses as written: Hydra commands compose (what ``--cfg job`` does, checked
in-process), argparse commands answer ``--help``, ``make`` targets exist."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from vss.cli import check_command_line
from vss.errors import ConfigError

README = REPO_ROOT / "README.md"
HYDRA_APPS = {
    "vss.train": "train",
    "vss.eval": "eval",
    "vss.predict": "predict",
    "vss.bench": "bench",
    "vss.pipeline": "train",
    "vss.export": "export",
}
ENTRY_POINTS = {f"vss-{name}": f"vss.{name}" for name in ("train", "eval", "predict", "bench", "export")}


def readme_commands() -> list[str]:
    """Shell commands of the README: lines of its fenced code blocks and inline commands of its tables."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():  # continued lines joined
            line = line.split("  #")[0].strip()
            if re.match(r"^(\S+=\S+ )*(python|make|vss-)", line):
                commands.append(line)
    for inline in re.findall(r"(?<!`)`((?:[^`\s]+=[^`\s]+ )*(?:python|vss-)[^`\n]*)`", text):  # not a ``` fence
        commands.append(inline.strip())
    placeholder = ("...", "…", "<")  # prose such as `python -m vss.…`, or <row> to fill in
    return list(dict.fromkeys(c for c in commands if not any(p in c for p in placeholder)))


def split_command(command: str) -> tuple[str, list[str]]:
    """(module or script or make, arguments) of a README command, without leading ``VAR=value`` assignments."""
    words = shlex.split(command)
    while "=" in words[0] and not words[0].startswith(("python", "make")):
        words = words[1:]
    if words[0] in ENTRY_POINTS:
        return ENTRY_POINTS[words[0]], words[1:]
    if words[0] == "make":
        return "make", words[1:]
    assert words[0] == "python", command
    if words[1] == "-m":
        return words[2], words[3:]
    return words[1], words[2:]


COMMANDS = readme_commands()


def test_the_readme_says_how_to_reach_the_cli() -> None:
    text = README.read_text()
    assert "source .venv/bin/activate" in text
    assert len(COMMANDS) > 20, COMMANDS  # the extraction found the README's examples


@pytest.mark.parametrize("command", [c for c in COMMANDS if split_command(c)[0] in HYDRA_APPS])
def test_hydra_command_composes(command: str) -> None:
    module, args = split_command(command)
    if module in ("vss.eval", "vss.predict", "vss.export"):  # model=FOLDER, rewritten by vss.cli.model_argument
        args = [f"ckpt_path={a[len('model=') :]}" if a.startswith("model=") else a for a in args]
    try:
        check_command_line(HYDRA_APPS[module], args)
    except ConfigError as e:
        pytest.fail(f"README command does not compose: {command}\n{e}")


def test_a_mistyped_readme_command_would_be_caught() -> None:
    with pytest.raises(ConfigError, match="did you mean `trainer.max_steps`"):
        check_command_line("train", ["model=segformer", "trainer.max_step=2000"])


ARGPARSE = sorted({split_command(c)[0] for c in COMMANDS} - set(HYDRA_APPS) - {"make"})


@pytest.mark.parametrize("program", ARGPARSE)
def test_argparse_command_answers_help(program: str, cli_env: dict[str, str]) -> None:
    cmd = [sys.executable, *(["-m", program] if not program.endswith(".py") else [program]), "--help"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=cli_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stdout + proc.stderr


def test_make_targets_exist() -> None:
    targets = {args[0] if args else "" for m, args in map(split_command, COMMANDS) if m == "make"}
    assert {"train", "test"} <= targets
    makefile = (REPO_ROOT / "Makefile").read_text()
    for target in targets:
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"make {target}: no such target"
