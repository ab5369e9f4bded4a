"""README.md keeps up with the code: every base_train flag is in its flag table, its file tree
names every file, no document or code speaks of issue numbers (nor README.md/RESULTS.md of old
and new defaults), the quickstart's time is stated once, its links land, and every command in
its ```bash blocks runs as written (recipes as dry runs, `python -m scripts.X` and torchrun
lines through the script's own argument parsing and checks, the iso_flops planner for real; the
few that cannot run here are listed in UNTESTED, each with its reason). ~2 s on one core."""

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG_SECTION = "## Training flags (`python -m scripts.base_train`)"
TREE_SECTION = "## Files"
# README commands that are not run or parsed here, and why
UNTESTED = {
    "bash runs/test.sh": "runs the whole test suite (minutes); CI runs exactly this (.ci/run)",
}
# the regex of the no-history rule, and phrases that tell a story instead of the state
ISSUE = re.compile(r"issue ?#?\d+", re.IGNORECASE)
HISTORY_PHRASES = re.compile(r"\b(old default|new default|no longer|not yet|before the router fixes)\b", re.IGNORECASE)


def read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def section(text, heading):
    """The lines under `heading` up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    assert heading in lines, f"README.md has no {heading!r} section"
    out = []
    for line in lines[lines.index(heading) + 1:]:
        m = re.match(r"(#+) ", line)
        if m and len(m.group(1)) <= level:
            break
        out.append(line)
    return out


def code_blocks(lines, lang=None):
    """(first line number, [lines]) of each fenced block (of that language)."""
    blocks, current, start, block_lang = [], None, 0, None
    for n, line in enumerate(lines, 1):
        if current is None and line.startswith("```"):
            current, start, block_lang = [], n + 1, line[3:].strip()
        elif current is not None and line.strip() == "```":
            if lang is None or block_lang == lang:
                blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


# ---------------------------------------------------------------------------------------------
# Every base_train flag documented

def flag_table_flags():
    """The flags named (in backticks) in the first column of the flag table(s)."""
    flags = set()
    for line in section(read("README.md"), FLAG_SECTION):
        if line.startswith("|"):
            flags.update(re.findall(r"`(--[a-z0-9][a-z0-9-]*)`", line.split("|")[1]))
    return flags


def test_every_base_train_flag_is_in_the_flag_table():
    from scripts.base_train import build_parser
    actions = build_parser()._actions
    options = {o for a in actions for o in a.option_strings if o not in ("-h", "--help")}
    table = flag_table_flags()
    # a BooleanOptionalAction's pair (--x and --no-x) is one flag: the table names it in either form
    missing = sorted({o for a in actions for o in a.option_strings if o not in ("-h", "--help") and o not in table
                      and not (isinstance(a, argparse.BooleanOptionalAction) and table & set(a.option_strings))})
    assert not missing, f"base_train flags missing from README.md's flag table ({FLAG_SECTION}): {missing}"
    unknown = sorted(table - options)
    assert not unknown, f"README.md's flag table names flags base_train does not have: {unknown}"


# ---------------------------------------------------------------------------------------------
# No history: state what is

def text_files(folder):
    for root, dirs, files in os.walk(os.path.join(REPO, folder)):
        dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
        for name in sorted(files):
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                data = f.read()
            if b"\0" not in data:
                yield os.path.relpath(path, REPO), data.decode("utf-8", errors="replace")


def test_no_issue_numbers_in_the_docs_and_code():
    files = [(p, read(p)) for p in ("README.md", "RESULTS.md")]
    for folder in ("nanochat", "scripts", "runs"):
        files += list(text_files(folder))
    hits = [f"{path}:{n}: {line.strip()}" for path, text in files
            for n, line in enumerate(text.splitlines(), 1) if ISSUE.search(line)]
    assert not hits, "say what is, not which issue changed it (dev/LOG.md and git keep that):\n" + "\n".join(hits)


def test_no_history_phrases_in_the_readme_and_results():
    hits = [f"{path}:{n}: {line.strip()}" for path in ("README.md", "RESULTS.md")
            for n, line in enumerate(read(path).splitlines(), 1) if HISTORY_PHRASES.search(line)]
    assert not hits, "state what is (\"the default is X\"), not what was:\n" + "\n".join(hits)


# ---------------------------------------------------------------------------------------------
# The file tree: one line per file, every file

def tree_entries():
    """{path: line} of the files the README's file tree names."""
    (_, lines), = code_blocks(section(read("README.md"), TREE_SECTION))
    entries, folder = {}, ""
    for line in lines:
        first = line.split()[0] if line.strip() else ""
        if not line.startswith(" ") and first.endswith("/"):
            folder = first
        elif line.startswith("  ") and not line.startswith("   ") and first:
            for name in re.findall(r"[\w.-]+\.\w+", line.split("  ")[1] if first.endswith(",") else first):
                entries[folder + name] = line
    return entries


def test_the_file_tree_names_every_file_and_only_files_that_exist():
    entries = tree_entries()
    listed_folders = {p.split("/")[0] for p in entries}
    assert {"nanochat", "scripts", "runs", "dev"} <= listed_folders
    expected = [f"{d}/{n}" for d, ext in (("nanochat", ".py"), ("scripts", ".py"), ("runs", ".sh"))
                for n in sorted(os.listdir(os.path.join(REPO, d))) if n.endswith(ext) and n != "__init__.py"]
    expected += [f"dev/{n}" for n in sorted(os.listdir(os.path.join(REPO, "dev")))
                 if os.path.isfile(os.path.join(REPO, "dev", n))]
    missing = [p for p in expected if p not in entries]
    assert not missing, f"files missing from README.md's file tree ({TREE_SECTION}): {missing}"
    gone = [p for p in entries if not os.path.exists(os.path.join(REPO, p))]
    assert not gone, f"README.md's file tree names files that do not exist: {gone}"


# ---------------------------------------------------------------------------------------------
# Every command runs as written

def readme_commands():
    """(line number, command) of every command in the README's ```bash blocks, continuation
    lines joined, comment lines left out."""
    cmds = []
    for start, lines in code_blocks(read("README.md").splitlines(), "bash"):
        buf, first = "", None
        for n, line in enumerate(lines, start):
            if not buf and (not line.strip() or line.lstrip().startswith("#")):
                continue
            first = first if buf else n
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            cmds.append((first, buf + line))
            buf = ""
    return cmds


def split_env(tokens):
    """NAME=VALUE assignments in front of a command, and the command."""
    env = {}
    while tokens and re.match(r"[A-Z_][A-Z0-9_]*=", tokens[0]):
        name, _, value = tokens.pop(0).partition("=")
        env[name] = value
    return env, tokens


def module_and_argv(tokens):
    """('scripts.X', argv) of `python -m scripts.X ...` or a torchrun line, else None."""
    if tokens[:1] in (["python"], ["python3"]) and tokens[1:2] == ["-m"] and tokens[2] != "torch.distributed.run":
        return tokens[2], tokens[3:]
    if tokens[:1] == ["torchrun"] or tokens[1:3] == ["-m", "torch.distributed.run"]:
        i = tokens.index("-m", 1 if tokens[0] == "torchrun" else 3)
        argv = tokens[i + 2:]
        return tokens[i + 1], argv[1:] if argv[:1] == ["--"] else argv
    return None


class _Parsed(Exception):
    pass


_parser_init = argparse.ArgumentParser.__init__


def _no_abbreviations(self, *args, **kwargs):
    _parser_init(self, *args, **kwargs)
    self.allow_abbrev = False


def parse_script_args(module, argv, monkeypatch):
    """Run `module`'s own argument parsing and checks on argv, without doing the work."""
    mod = importlib.import_module(module)
    if module == "scripts.base_train":
        from nanochat.model_args import validate_model_args
        args = mod.parse_args(argv)
        validate_model_args(args)
        mod.explicit_flags(argv)
        return args
    if hasattr(mod, "parse_args"):
        return mod.parse_args(argv)
    if hasattr(mod, "build_parser"):
        return mod.build_parser().parse_args(argv)
    # a main() that builds its parser inline: stop it right after its parse_args
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(_Parsed) as parsed:
        mod.main()
    return parsed.value.args[0]


def check_script_command(cmd, monkeypatch):
    env, tokens = split_env(shlex.split(cmd, comments=True))
    found = module_and_argv(tokens)
    assert found and found[0].startswith("scripts."), f"not a python -m scripts.X command: {cmd}"
    module, argv = found
    assert os.path.exists(os.path.join(REPO, *module.split(".")) + ".py"), f"no module {module}"
    import torch
    try:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            m.setattr(torch.cuda, "is_available", lambda: True)  # GPU commands: the machine aside
            m.setattr(argparse.ArgumentParser, "__init__", _no_abbreviations)  # flags as written, in full
            parse_script_args(module, argv, m)
    except SystemExit as e:  # argparse and UserError end in one line and exit 2
        pytest.fail(f"{cmd}\n  exits {e.code} while parsing its arguments")


def without_comment(cmd):
    return shlex.join(shlex.split(cmd, comments=True))


def classify(cmd):
    tokens = split_env(shlex.split(cmd, comments=True))[1]
    if without_comment(cmd) in UNTESTED:
        return "untested"
    if tokens[:1] == ["bash"] and tokens[1:2] and tokens[1].startswith("runs/"):
        return "recipe"
    if module_and_argv(tokens):
        return "script"
    return None


COMMANDS = readme_commands()


def test_readme_commands_are_all_checked():
    assert COMMANDS, "no ```bash blocks found in README.md"
    unchecked = [f"README.md:{n}: {c}" for n, c in COMMANDS if classify(c) is None]
    assert not unchecked, ("README commands this test neither runs nor parses (make them checkable, or add them "
                           "to UNTESTED with the reason):\n" + "\n".join(unchecked))
    stale = [c for c in UNTESTED if c not in {without_comment(c) for _, c in COMMANDS}]
    assert not stale, f"UNTESTED lists commands the README does not show: {stale}"


@pytest.mark.parametrize("n,cmd", [(n, c) for n, c in COMMANDS if classify(c) == "script"],
                         ids=[f"README.md:{n}" for n, c in COMMANDS if classify(c) == "script"])
def test_readme_script_command_parses(n, cmd, monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    check_script_command(cmd, monkeypatch)


@pytest.mark.parametrize("n,cmd", [(n, c) for n, c in COMMANDS if classify(c) == "recipe"],
                         ids=[f"README.md:{n}" for n, c in COMMANDS if classify(c) == "recipe"])
def test_readme_recipe_command_dry_runs(n, cmd, tmp_path, monkeypatch):
    """DRY_RUN=1: the recipe prints its commands and exits 0; each knob the README sets is one
    the script reads; each `python -m scripts.X` it prints parses too."""
    env, tokens = split_env(shlex.split(cmd, comments=True))
    script = read(tokens[1])
    for name in env:
        assert re.search(r"\$\{?" + name + r"\b", script), f"{tokens[1]} has no knob {name}: {cmd}"
    run_env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path), "OUT": str(tmp_path / "out"), **env, "DRY_RUN": "1"}
    r = subprocess.run(tokens, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{cmd}\n{r.stderr}"
    printed = [line[2:] for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert printed, f"{cmd}: DRY_RUN=1 printed no command"
    for line in printed:
        if "-m scripts." in line and "$(" not in line:
            tokens = shlex.split(line)
            i = next(i for i, t in enumerate(tokens) if t in ("python", "python3") or t.endswith("/python"))
            tokens[i] = "python"
            check_script_command(shlex.join(tokens[i:]), monkeypatch)


def test_iso_flops_command_runs_as_written(capsys, monkeypatch, tmp_path):
    """The planner is cheap: run the README's iso_flops line for real."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    (cmd,) = [c for _, c in COMMANDS if "scripts.iso_flops" in c]
    _, argv = module_and_argv(shlex.split(cmd, comments=True))
    from scripts import iso_flops
    monkeypatch.setattr(sys, "argv", ["iso_flops", *argv])
    iso_flops.main()
    assert "iso-FLOPs expert width" in capsys.readouterr().out


def test_one_quickstart_time():
    """The quickstart's time is stated once, in one sentence of its how-to (easy to update),
    saying what it includes; no other line of README.md or RESULTS.md times the quickstart."""
    timed = re.compile(r"\d+ min\b|\d+ s\b|\bminutes?\b")
    hits = [line for line in section(read("README.md"), "### The quickstart") if timed.search(line)]
    assert len(hits) == 1, f"the quickstart's time should be one sentence, found {hits}"
    assert "takes" in hits[0] and "NANOCHAT_BASE_DIR" in hits[0], hits[0]  # from where, what it includes
    others = [f"{path}:{n}: {line}" for path in ("README.md", "RESULTS.md")
              for n, line in enumerate(read(path).splitlines(), 1)
              if line != hits[0] and timed.search(line) and re.search(r"runcpu|quickstart(?![-\w])", line, re.IGNORECASE)]
    assert not others, "a second quickstart time:\n" + "\n".join(others)


def test_links_to_sections_and_files_resolve():
    """Every [text](#anchor) and [text](FILE#anchor) link of README.md and RESULTS.md lands (GitHub's
    heading anchors: lower case, punctuation dropped, spaces to dashes)."""
    def anchors(path):
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", read(path), re.MULTILINE)}
    bad = []
    for path in ("README.md", "RESULTS.md"):
        for target in re.findall(r"\]\(([^)\s]+)\)", read(path)):
            if target.startswith("http"):
                continue
            file, _, anchor = target.partition("#")
            file = file or path
            if not os.path.exists(os.path.join(REPO, file)) or (anchor and anchor not in anchors(file)):
                bad.append(f"{path}: ({target})")
    assert not bad, "links that land nowhere:\n" + "\n".join(bad)
