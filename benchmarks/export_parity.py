"""Exported graphs vs the eager model, per precision, for the embedded default and the random
d16-proportioned model: the figures every export writes to ``var_ecm.verify.json``, side by side.

    python benchmarks/export_parity.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
from ecm.export.pipeline import ExportOptions, Models, export_model

from ecm.bench.models import d16_proportioned
from ecm.model.embedded import load_default


@click.command()
def main() -> None:
    """Logits difference, sampled-token and teacher-forced agreement of fp32 and fp16 exports."""
    _, var, ecm = load_default()
    models = {"embedded default": (var, ecm), "d16-proportioned": d16_proportioned()}
    click.echo(f"{'model':18}{'precision':>10}{'logits rel diff':>17}{'tokens (worst)':>16}"
               f"{'teacher top-1 (worst)':>23}{'scale-0 rel diff':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (v, e) in models.items():
            for precision in ("fp32", "fp16"):
                out = Path(tmp) / f"{name}-{precision}"
                r = export_model(Models(v, e), out, ExportOptions(precision=precision), progress=lambda _: None).report
                click.echo(f"{name:18}{precision:>10}{r.worst_rel_diff:17.1e}{100 * r.min_token_agreement:15.1f}%"
                           f"{100 * r.min_teacher_agreement:22.1f}%{r.scales[0].logits_rel_diff:18.1e}")
    click.echo("Free-running reduced precision diverges after the first flipped sample; teacher forcing measures "
               "each scale on the eager model's inputs.")


if __name__ == "__main__":
    main()
