"""Command line: flags and environment -> configs -> components. Nothing else."""
