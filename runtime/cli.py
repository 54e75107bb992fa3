"""``ecm-run``: generation on the target device, torch-free."""

from __future__ import annotations

import click

from .errors import exit_on_error, not_built


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@exit_on_error
def main() -> None:
    """Generate images with an exported engine (not built yet)."""
    not_built("ecm-run", "the runtime issue")
