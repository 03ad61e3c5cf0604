"""What a failing lite-train command printed: exactly one `error: ...` line and no traceback."""

from __future__ import annotations


def one_error_line(output: str) -> str:
    """The single line starting with "error: " in `output` (progress lines may surround it); fails the test if
    there is none, more than one, or a traceback."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    return errors[0]
