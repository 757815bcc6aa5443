"""aletheia-hpc: gradient-guided selective LoRA (Aletheia) campaigns on SLURM clusters."""

__version__ = "0.1.0"
