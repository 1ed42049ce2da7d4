"""Read back what ``CPPO_PRINT_CMD=1`` prints: a command pasteable into a shell."""

import subprocess


def printed_command(stdout: str) -> list[str]:
    """The argv of the last command in ``stdout`` (its lines continued with ``\\``), exactly as bash reads it
    when the text is pasted: the test of "pasteable" is bash's own parse."""
    lines = stdout.rstrip("\n").splitlines()
    start = len(lines) - 1
    while start > 0 and lines[start - 1].endswith(" \\"):
        start -= 1
    text = "\n".join(lines[start:])
    out = subprocess.run(
        ["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", text],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.split("\0")[:-1]
