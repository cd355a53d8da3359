"""Driving the CLI in tests: run a command in-process, and the one-line error it must end with."""

from __future__ import annotations

from click.testing import CliRunner

from epicode_edge.cli import main


def cli(*args, input=None) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `epicode-edge ARGS`, run in this process."""
    r = CliRunner().invoke(main, [str(a) for a in args], input=input)
    return r.exit_code, r.output


def one_error_line(output: str) -> str:
    """The single `Error: ...` line of a failed command (no traceback, no second error)."""
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output
    return errors[0]


def assert_one_line_error(code: int, output: str, *expect: str) -> None:
    """Exit code 1 and one error line holding every string of `expect`."""
    assert code == 1, output
    line = one_error_line(output)
    for e in expect:
        assert e in line, (e, line)
