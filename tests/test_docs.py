"""The documentation stays true: every relative link resolves, docs/settings.md's tables are the `--help`
texts (regenerate them with `python tests/test_docs.py`), and the README's test command is CI's."""

from __future__ import annotations

import json
import re
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ROOT / "docs" / "settings.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# fit's settings whose help is Lightning's own (docs/settings.md describes them by hand, defaults checked below).
LIGHTNING_SETTINGS = (
    "trainer.",
    "checkpoint.",
    "seed_everything",
    "ckpt_path",
    "weights_only",
    "optimizer",
    "lr_scheduler",
)
BLOCK = re.compile(r"(<!-- settings: (\S+) -->\n)(.*?)(<!-- /settings -->)", re.S)


# --- the settings `--help` shows -------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def fit_parser():
    """The parser LightningCLI builds for `fit`, taken before it parses anything (nothing runs, nothing is read)."""
    from bdh_lightning.cli import BDHCLI

    class Built(Exception):
        pass

    class ParserOnly(BDHCLI):
        def parse_arguments(self, parser, args):
            raise Built(parser)

    try:
        ParserOnly(args=["fit"])
    except Built as built:
        return built.args[0]._subcommands_action._name_parser_map["fit"]
    raise AssertionError("BDHCLI parsed its arguments without calling parse_arguments")


@lru_cache(maxsize=None)
def command_parser(name: str):
    """The parser main.run_command builds for a typed command, from its signature and docstring."""
    from jsonargparse import ArgumentParser

    from bdh_lightning.main import command_function

    parser = ArgumentParser()
    parser.add_function_arguments(command_function(name), as_group=False)
    return parser


def settings_of(parser) -> dict:
    """dest -> action for every setting of a parser (not --help, --config and the group loaders)."""
    skipped = ("_HelpAction", "ActionConfigFile", "_ActionConfigLoad", "_ActionPrintConfig", "_ActionHelpClassPath")
    return {
        action.dest: action
        for action in parser._actions
        if type(action).__name__ not in skipped and not action.dest.endswith(".help")
    }


def own_fit_settings() -> dict:
    return {k: a for k, a in settings_of(fit_parser()).items() if not k.startswith(LIGHTNING_SETTINGS)}


def block_settings(block: str) -> dict:
    """A block's settings: `fit:model` (model.*), `fit:` (fit's own top-level ones) or a command's name."""
    command, _, prefix = block.partition(":")
    if command != "fit":
        return settings_of(command_parser(command))
    own = own_fit_settings()
    if prefix:
        return {k: a for k, a in own.items() if k.startswith(prefix + ".")}
    return {k: a for k, a in own.items() if "." not in k}


def shown_default(value) -> str:
    if isinstance(value, str) and value and value.strip() == value:
        return value
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def help_text(action) -> str:
    return " ".join(action.help.split()).replace("%%", "%").replace("|", "\\|")


def settings_table(block: str) -> str:
    command = block.partition(":")[0]
    key = "YAML key" if command == "fit" else "option"
    rows = [f"| {key} | default | effect (`--help`) |", "| --- | --- | --- |"]
    for dest, action in block_settings(block).items():
        name = dest if command == "fit" else f"--{dest}"
        rows.append(f"| `{name}` | `{shown_default(action.default)}` | {help_text(action)} |")
    return "\n".join(rows) + "\n"


def regenerated(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + settings_table(m.group(2)) + m.group(4), text)


def test_settings_tables_are_the_help_texts():
    text = SETTINGS.read_text()
    assert text == regenerated(text), "docs/settings.md differs from --help: run `python tests/test_docs.py`"


def test_every_own_setting_and_command_has_a_table():
    from bdh_lightning.cli import COMMANDS

    blocks = [m.group(2) for m in BLOCK.finditer(SETTINGS.read_text())]
    assert len(blocks) == len(set(blocks)), "a settings block appears twice"
    covered = {dest for block in blocks if block.startswith("fit") for dest in block_settings(block)}
    missing = sorted(set(own_fit_settings()) - covered)
    assert not missing, f"fit settings without a table in docs/settings.md: {missing}"
    assert set(COMMANDS) <= set(blocks), "every command's options have a table"


def test_lightning_settings_quote_their_defaults():
    """Rows `| `trainer.x` | `default` | ... |` written by hand name real settings, at their real default."""
    settings = settings_of(fit_parser())
    rows = re.findall(
        r"^\| `((?:trainer|checkpoint)\.\w+|seed_everything)` \| `([^`]*)` \|", SETTINGS.read_text(), re.M
    )
    assert len(rows) >= 5
    for key, default in rows:
        assert key in settings, f"docs/settings.md: {key} is not a setting of fit"
        assert default == shown_default(settings[key].default), f"docs/settings.md: {key}'s default"


# --- links -----------------------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link targets and markup dropped, lower case, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where links are links."""
    text = re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose_headings(path.read_text()), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def prose_headings(text: str) -> str:
    """Headings keep their inline code (it counts in the anchor); fenced blocks hold no headings."""
    return re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M)


def links(path: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(path.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:: not checked offline
        file, _, anchor = target.partition("#")
        where = (page.parent / file).resolve() if file else page
        if not where.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_files_named_in_code_spans_exist(page):
    """`bdh_lightning/x.py`, `tests/x.py`, `benchmarks/x.py` written in a page are files of the repository."""
    named = re.findall(r"`((?:bdh_lightning|tests|benchmarks)/[\w/]+\.py)`", page.read_text())
    assert not [path for path in named if not (ROOT / path).exists()], f"{page.name} names files that do not exist"


def test_the_link_checker_finds_a_broken_link(tmp_path):
    (tmp_path / "b.md").write_text("# Crashes and resume: `last`\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#crashes-and-resume-last) [gone](c.md) [no](b.md#resume) `[code](x.md)`\n")
    assert links(page) == ["b.md#crashes-and-resume-last", "c.md", "b.md#resume"]
    assert anchors(tmp_path / "b.md") == {"crashes-and-resume-last"}


# --- the README's test command ---------------------------------------------------------------------------------


def commands(lines: list[str]) -> list[list[str]]:
    """Shell lines as argument lists, split at `&&` and `;`, with `|| true` and pip's flags that change its
    output and speed, not what it installs (-q, --no-compile), dropped."""
    found = []
    for line in lines:
        line = line.split("#")[0].replace("|| true", "")
        for part in re.split(r"&&|;", line):
            words = [w for w in shlex.split(part) if w not in ("-q", "--no-compile")]
            if words:
                found.append(words)
    return found


def test_readme_tables_list_every_command_and_config():
    from bdh_lightning.cli import COMMANDS, TRAINER_COMMANDS

    readme = (ROOT / "README.md").read_text()
    commands_listed = re.findall(r"^\| `(\w+)` \| ", readme, re.M)
    assert commands_listed == [*TRAINER_COMMANDS, *COMMANDS], "README.md's commands table against `--help`"
    configs_listed = sorted(re.findall(r"^\| `(configs/[\w.]+\.yaml)` \| ", readme, re.M))
    assert configs_listed == sorted(f"configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml"))


def test_readme_test_command_is_what_ci_runs():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith(("pip ", "python "))]
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"Run the tests.*?```bash\n(.*?)```", readme, re.S)
    assert block, "README.md: no ```bash block after 'Run the tests'"
    ran = [c for c in commands(block.group(1).splitlines()) if c[0] in ("pip", "python")]
    assert ran == commands(ci), "README.md's test command differs from what .ci/run runs"
    assert ran[-1][:3] == ["python", "-m", "pytest"]


if __name__ == "__main__":  # regenerate docs/settings.md's tables from the --help texts
    SETTINGS.write_text(regenerated(SETTINGS.read_text()))
    sys.exit(0)
