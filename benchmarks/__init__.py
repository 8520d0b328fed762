"""Benchmarks that reproduce the papers' comparison on one machine.

Run ``python benchmarks/run.py`` (full run) or ``python benchmarks/run.py --quick``;
see ``benchmarks/README.md``. The modules here are imported by Dask worker processes
and Ray actors too, so task functions and loaders live in importable modules.
"""
