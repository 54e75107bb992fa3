"""Command-line entry points that need torch: ``ecm-pretrain``, ``ecm-train``, ``ecm-eval``, ``ecm-export``."""

from __future__ import annotations

import click

from ecm.runtime.errors import exit_on_error, not_built


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@exit_on_error
def pretrain() -> None:
    """Train a small VQVAE and VAR backbone from scratch (not built yet)."""
    not_built("ecm-pretrain", "the ECM training issue")


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@exit_on_error
def train() -> None:
    """Train ECM control adapters on a frozen VAR backbone (not built yet)."""
    not_built("ecm-train", "the ECM training issue")


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@exit_on_error
def evaluate() -> None:
    """Measure control fidelity of a trained ECM (not built yet)."""
    not_built("ecm-eval", "the ECM training issue")


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@exit_on_error
def export() -> None:
    """Export backbone + adapters to ONNX and TensorRT (not built yet)."""
    not_built("ecm-export", "the export issue")
