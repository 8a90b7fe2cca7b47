"""Data sets, fitting (single process or torchrun DDP), evaluation and the recon-train CLI."""
