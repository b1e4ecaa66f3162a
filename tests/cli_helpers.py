"""CLI helpers shared by the tests that drive ``tagdiff.cli.main`` (imported like ``tfg_reference``)."""

from tagdiff.cli.main import main


def run(*argv):
    """Run the CLI in-process; it must succeed (exit code 0)."""
    assert main([str(a) for a in argv]) == 0


def error_line(capsys, *argv):
    """Run the CLI expecting a bad-input refusal: exit code 2 and exactly one ``tagdiff: error: ...`` line on stderr,
    with no traceback. Returns that line."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tagdiff: error: ") and "Traceback" not in err[0], err
    return err[0]
