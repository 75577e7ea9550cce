"""Prefill/decode disaggregation inside the engine: hand-off states and block holds (DESIGN
8.3); the P-D connector (control plane) is being built on them."""
