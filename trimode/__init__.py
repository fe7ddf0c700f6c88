"""trimode: an ahead-of-time compiled inference engine for Nemotron-Labs Diffusion (tri-mode) models."""

__version__ = "0.1.0"
