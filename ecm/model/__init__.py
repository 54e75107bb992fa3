"""The networks (VQVAE, VAR, ECM adapters), their layers, sampling and checkpoints. Needs torch; imports
only ``ecm.runtime`` besides itself."""
