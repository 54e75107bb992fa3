"""Several controls at once, inpainting and outpainting on the embedded default model (issue 17's figures).

    python benchmarks/composable.py [--images 64] [--json composable.json]

Held-out procedural images, the same classes and seeds for every variant; see ecm/bench/composable.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ecm.bench.composable import box_mask, combination, editing, figures_dict, held_out, outpainting
from ecm.model.adapters import load_ecm
from ecm.model.embedded import default_ecm_paths, load_backbone


@click.command()
@click.option("--images", default=64, show_default=True, type=click.IntRange(min=1), help="Held-out images.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as JSON.")
def main(images: int, json_path: Path | None) -> None:
    """Print each control alone / together / without control, and the kept and generated regions of edits.

    Edits: the kept region's PSNR against the input, the VQVAE reconstruction's, their gap in dB, the gap
    had the final latent been decoded alone (before the reconstruction is pasted into the kept pixels), and
    the Canny F1 of the generated region with and without the Canny adapters.
    """
    _, var = load_backbone()
    ecms = [load_ecm(p, var)[0] for p in default_ecm_paths()]
    R = var.vae.config.resolution
    pictures, labels = held_out(images, R)
    combo = combination(var, ecms, pictures, labels)
    click.echo(f"{'control':10} {'metric':8} {'alone':>8} {'together':>9} {'backbone':>9} {'kept':>6} {'margin':>7}")
    for c in combo:
        click.echo(f"{c.control:10} {c.metric:8} {c.alone:8.4f} {c.together:9.4f} {c.backbone:9.4f} "
                   f"{c.kept:6.1%} {c.margin:6.2f}x")
    canny = next(e for e in ecms if e.config.control == "canny")
    n = len(labels)
    edits = [editing(var, canny, "inpaint centre box 24 px", pictures, box_mask(n, R, 20, 20, 24, 24), labels),
             editing(var, canny, "inpaint left strip 16 px", pictures, box_mask(n, R, 0, 0, R, 16), labels),
             editing(var, canny, "inpaint right half", pictures, box_mask(n, R, 0, R // 2, R, R // 2), labels),
             outpainting(var, pictures, labels, {"left": 16, "right": 16}),
             outpainting(var, pictures, labels, {"top": 16})]
    click.echo(f"\n{'edit':28} {'kept PSNR':>10} {'VQVAE rec':>10} {'gap dB':>7} {'latent only':>12} "
               f"{'gen F1 ECM':>11} {'gen F1 none':>12}")
    for e in edits:
        f1 = (f"{e.generated_f1_ecm:11.4f} {e.generated_f1_backbone:12.4f}" if e.generated_f1_ecm is not None
              else f"{'-':>11} {'-':>12}")
        click.echo(f"{e.name:28} {e.kept_psnr:10.2f} {e.recon_psnr:10.2f} {e.kept_gap_db:7.2f} "
                   f"{e.latent_only_gap_db:12.2f} {f1}")
    if json_path is not None:
        json_path.write_text(json.dumps({"images": n, "controls": figures_dict(combo), "edits": figures_dict(edits)},
                                        indent=2))
        click.echo(f"wrote {json_path}")


if __name__ == "__main__":
    main()
