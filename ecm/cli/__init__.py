"""The console scripts, on top of every other layer. ``ecm-run`` (``ecm.cli.run``) imports no torch."""
