"""INT8 calibration from real generation trajectories (installed as ``ecm.calibration``)."""
