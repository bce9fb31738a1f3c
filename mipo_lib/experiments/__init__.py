"""Experiments: the workbook's runs built on the core (pipeline, tuning, held-out types, ablations, reasoning)."""
