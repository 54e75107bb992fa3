"""Datasets and control maps of training images (NumPy and PIL, no torch); imports only ``ecm.runtime``."""
