"""A throw-away SLURM cluster on this machine, for tests and for trying ``cluster/submit.py``."""
