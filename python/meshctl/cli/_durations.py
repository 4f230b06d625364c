"""Durations on the command line: Go-style as Istio writes them (90s, 30m, 1h, 1h30m), or plain seconds."""

from __future__ import annotations

import typer


def parse_duration(text: str, option: str) -> float:
    """Seconds; typer.BadParameter (exit 2) naming the option when `text` is not a duration."""
    from meshctl.resources.common import duration_seconds

    stripped = text.strip()
    try:
        seconds = (
            float(stripped)
            if stripped.replace(".", "", 1).isdigit()
            else duration_seconds(stripped)
        )
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint=option) from None
    if seconds <= 0:
        raise typer.BadParameter(f"{text!r} must be longer than zero", param_hint=option)
    return seconds
