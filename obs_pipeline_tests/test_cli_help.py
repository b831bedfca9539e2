"""`obs-pipeline`'s own word on itself: every command and option says what it does and its
default (`-h`), and every numeric option refuses what it cannot take where it is parsed: one
usage line naming the option and what it takes, exit 2, nothing started and no server asked.

The parser is walked, not listed: a new option without help, or a new number taken with a bare
`int` or `float`, fails here."""

from __future__ import annotations

import argparse
import socket

import psycopg2
import pytest

from obs_pipeline import cli

# Numbers any whole number of which is fine (argparse's `int` refuses the rest): a seed.
PLAIN_INT_OPTIONS = {("simulate", "--seed")}


def commands() -> dict[str, argparse.ArgumentParser]:
    """'' for `obs-pipeline` itself, then each command's parser (and any under those)."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(path: str, parser: argparse.ArgumentParser) -> None:
        found[path] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(f"{path} {name}".strip(), child)

    walk("", cli.build_parser())
    return found


def documented(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments a user gives (all but -h and the command list)."""
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def name(action: argparse.Action) -> str:
    return max(action.option_strings, key=len) if action.option_strings else action.dest


COMMANDS = commands()
OPTIONS = [(path, name(action)) for path, parser in COMMANDS.items() for action in documented(parser)]
TYPED = [(path, name(action)) for path, parser in COMMANDS.items() for action in documented(parser)
         if action.type is not None]


def action_of(path: str, option: str) -> argparse.Action:
    return next(a for a in documented(COMMANDS[path]) if name(a) == option)


def watch_what_it_touches(monkeypatch, *, commands: bool = False) -> list[str]:
    """What a command line reached for: a socket (Redis, the Dagster UI), a PostgreSQL
    connection, the local stack, `dev`, `bench`, and with `commands` any cmd_* at all; each is
    refused, so a line the parser let through (the code before these checks) fails fast here,
    and starts no bench or drain."""
    from obs_pipeline import bench, dev
    from obs_pipeline.stack.local_stack import LocalStack

    reached: list[str] = []

    def spy(what: str):
        def refuse(*args, **kwargs):
            reached.append(what)
            raise RuntimeError(f"the refused command line reached for {what}")
        return refuse

    monkeypatch.setattr(socket.socket, "connect", spy("a socket"))
    monkeypatch.setattr(psycopg2, "connect", spy("PostgreSQL"))
    for method in ("up", "down", "status", "env", "stop_service", "start_service"):
        monkeypatch.setattr(LocalStack, method, spy(f"the local stack ({method})"))
    monkeypatch.setattr(dev, "run_dev", spy("dev"))
    monkeypatch.setattr(bench, "run_bench", spy("bench"))  # (as cmd_bench imports it)
    if commands:  # (build_parser binds them when main calls it)
        for attr in dir(cli):
            if attr.startswith("cmd_"):
                monkeypatch.setattr(cli, attr, spy(f"`{attr}`"))
    return reached


def refused(capsys, monkeypatch, argv: list[str], *, commands: bool = True) -> str:
    """The one stderr line of a usage error (exit 2), nothing on stdout, nothing reached for."""
    with monkeypatch.context() as patched:
        reached = watch_what_it_touches(patched, commands=commands)
        try:
            code = cli.main(argv)  # (returned: the line was taken and the command ran)
        except SystemExit as exited:
            code = exited.code
    out, err = capsys.readouterr()
    assert reached == [], f"`obs-pipeline {' '.join(argv)}` reached for {', '.join(reached)}: {err}"
    assert code == 2, (argv, code, out, err)
    assert out == "" and len(err.strip().splitlines()) == 1, (argv, out, err)
    return err.strip()


def help_of(path: str, capsys, monkeypatch) -> str:
    """`obs-pipeline PATH --help` as run (exit 0), its words on one line (COLUMNS wide: argparse
    would break a long word at its hyphen)."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exited:
        cli.main([*path.split(), "--help"])
    out, err = capsys.readouterr()
    assert exited.value.code == 0 and err == "", err
    return " ".join(out.split())


# --- help -----------------------------------------------------------------------------------

def test_the_walk_finds_every_command():
    assert set(COMMANDS) == {"", "stack", "db", "dev", "drain", "status", "spool", "failed", "simulate", "bench"}


@pytest.mark.parametrize("path", [p for p in COMMANDS if p])
def test_every_command_says_what_it_does_in_the_list_and_atop_its_own_help(path, capsys, monkeypatch):
    listed = next(a for a in COMMANDS[""]._actions if isinstance(a, argparse._SubParsersAction))
    summary = next(c.help for c in listed._choices_actions if c.dest == path)
    assert summary and summary.strip(), f"`{path}` has no help in `obs-pipeline -h`"
    assert " ".join(summary.split()) in help_of(path, capsys, monkeypatch)  # atop its own -h


@pytest.mark.parametrize("path, option", OPTIONS)
def test_every_option_has_help_that_gives_its_default(path, option, capsys, monkeypatch):
    """Non-empty help in the parser and in `obs-pipeline CMD --help`; an option that has a default
    value (not a flag, not 'none') says what it is."""
    action = action_of(path, option)
    assert action.help and action.help.strip() and action.help is not argparse.SUPPRESS, \
        f"`obs-pipeline {path} {option}` has no help"
    if action.default not in (None, False, argparse.SUPPRESS):
        assert "default" in action.help, f"`obs-pipeline {path} {option}` does not say its default {action.default!r}"
    out = help_of(path, capsys, monkeypatch)
    assert (option if action.option_strings else (action.metavar or "")) in out
    assert " ".join(action.help.split())[:60] in out, out  # printed, %-formatting and all


# --- numbers checked where they are parsed ------------------------------------------------------

@pytest.mark.parametrize("path, option", TYPED)
def test_every_numeric_option_takes_a_checked_type(path, option):
    """A bare int or float takes -1 and 0, and float takes inf and nan: the drain waited for ever."""
    action = action_of(path, option)
    assert action.type not in (int, float) or (path, option) in PLAIN_INT_OPTIONS, \
        f"`obs-pipeline {path} {option}` takes a bare {action.type.__name__}: give it a checked type from cli.py"


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999", "", "ten", "0x10"])
@pytest.mark.parametrize("path, option", TYPED)
def test_no_numeric_option_takes_what_is_no_number(path, option, value, capsys, monkeypatch):
    line = refused(capsys, monkeypatch, [*path.split(), f"{option}={value}"])
    assert line.startswith(f"obs-pipeline {path}: error: argument {option}: ") and \
        line.endswith(f"(see `obs-pipeline {path} -h`)"), line


# (command line, the option, what the line says it takes); the values given with `=` ("-1" alone
# may read as an option)
OUT_OF_RANGE = [
    (["drain", "--batch-size=0"], "--batch-size", "give transactions per batch, a whole number of 1 or more"),
    (["drain", "--batch-size=-5"], "--batch-size", "give transactions per batch, a whole number of 1 or more"),
    (["drain", "--batch-size=1.5"], "--batch-size", "give transactions per batch, a whole number of 1 or more"),
    (["drain", "--max-batch-size=0"], "--max-batch-size", "give transactions per batch, a whole number of 1 or more"),
    (["drain", "--lease-ttl=0"], "--lease-ttl", "give seconds, a number from 0.001 to 86400"),
    (["drain", "--lease-ttl=-60"], "--lease-ttl", "give seconds, a number from 0.001 to 86400"),
    (["drain", "--lease-ttl=86401"], "--lease-ttl", "give seconds, a number from 0.001 to 86400"),
    (["drain", "--replication-timeout=-1"], "--replication-timeout", "give seconds, a number from 0 to 86400"),
    (["drain", "--replication-timeout=1e300"], "--replication-timeout", "give seconds, a number from 0 to 86400"),
    (["bench", "--batch-size=0"], "--batch-size", "give transactions per batch, a whole number of 1 or more"),
    (["bench", "--backlog=-1"], "--backlog", "give transactions, a whole number of 0 or more"),
    (["dev", "--port=0"], "--port", "give a TCP port, a whole number from 1 to 65535"),
    (["dev", "--port=65536"], "--port", "give a TCP port, a whole number from 1 to 65535"),
    (["dev", "--rate=0"], "--rate", "give observations per second, a finite number above 0"),
    (["dev", "--main-latency-ms=-1"], "--main-latency-ms", "from 0 to 5000"),
    (["stack", "up", "--main-latency-ms=5001"], "--main-latency-ms", "from 0 to 5000"),
    (["simulate", "--rate=-1"], "--rate", "give observations per second, a finite number above 0"),
    (["simulate", "--count=0"], "--count", "give observations, a whole number of 1 or more"),
    (["simulate", "--duration=0"], "--duration", "give seconds, a finite number above 0"),
    (["simulate", "--files=0"], "--files", "give files per observation, a whole number from 1 to 100000"),
]


@pytest.mark.parametrize("argv, option, takes", OUT_OF_RANGE)
def test_a_number_out_of_range_is_one_usage_line_naming_the_option_and_what_it_takes(argv, option, takes, capsys,
                                                                                      monkeypatch):
    line = refused(capsys, monkeypatch, argv)
    assert line.startswith(f"obs-pipeline {argv[0]}: error: argument {option}: ") and takes in line, line


def test_the_out_of_range_table_covers_every_checked_option():
    covered = {(argv[0], option) for argv, option, _ in OUT_OF_RANGE}
    assert {(p, o) for p, o in TYPED if (p, o) not in PLAIN_INT_OPTIONS} <= covered


def test_a_max_batch_size_below_the_batch_size_is_one_usage_line_naming_both(capsys, monkeypatch):
    line = refused(capsys, monkeypatch, ["drain", "--batch-size", "5000", "--max-batch-size", "100"],
                   commands=False)  # (checked in cmd_drain, before it reads the environment)
    assert line == ("obs-pipeline drain: error: argument --max-batch-size: 100 is below --batch-size 5000: give 5000 "
                    "or more, or leave it out (see `obs-pipeline drain -h`)"), line


@pytest.mark.parametrize("argv, dest, value", [
    (["drain", "--replication-timeout", "0"], "replication_timeout", 0.0),  # do not wait for the replica
    (["drain", "--lease-ttl", "0.001"], "lease_ttl", 0.001),
    (["drain", "--lease-ttl", "86400"], "lease_ttl", 86400.0),
    (["drain", "--batch-size", "1"], "batch_size", 1),
    (["bench", "--backlog", "0"], "backlog", 0),
    (["dev", "--port", "65535"], "port", 65535),
    (["stack", "up", "--main-latency-ms", "0"], "main_latency_ms", 0),
    (["simulate", "--rate", "0.2"], "rate", 0.2),
    (["simulate", "--seed", "-7"], "seed", -7),
])
def test_the_edges_of_what_is_allowed_are_taken(argv, dest, value):
    assert getattr(cli.build_parser().parse_args(argv), dest) == value


# --- a refused line touches nothing -------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["drain", "--once", "--replication-timeout", "inf"],
    ["drain", "--lease-ttl", "nan"],
    ["drain", "--once", "--batch-size", "0"],
    ["drain", "--batch-size", "10", "--max-batch-size", "5"],
    ["simulate", "--count", "2", "--rate", "0"],
    ["simulate", "--duration=-1"],
    ["dev", "--port", "0"],
    ["dev", "--simulate", "--rate", "nan"],
    ["stack", "up", "--main-latency-ms=-1"],
    ["bench", "--quick", "--batch-size", "0"],
    ["bench", "--quick", "--backlog=-10"],
])
def test_a_refused_command_line_starts_nothing_and_leaves_redis_as_it_was(argv, stack_urls, site, redis_client,
                                                                          tmp_path, monkeypatch, capsys):
    """OBS_* point at the test stack's real Redis and databases, under a site of the test's own:
    after the usage line its keys are as they were (none), and nothing was connected to."""
    for key, value in {**stack_urls, "OBS_SITE": site, "OBS_STACK_DIR": str(tmp_path / "stack"),
                       "OBS_SPOOL_DIR": str(tmp_path / "spool")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, monkeypatch, [*argv, "--out", str(tmp_path / "out")] if argv[0] == "bench" else argv,
                   commands=False)  # the commands as they are: what they touch is watched
    assert f"obs-pipeline {argv[0]}: error: argument --" in line, line
    assert redis_client.keys(f"site:{site}:*") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no stack folder, spool or bench output made
