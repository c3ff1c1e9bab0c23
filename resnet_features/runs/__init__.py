"""Runs: the commit protocol of a run, the ledger of what each run computed, and the catalog
every reader of an output goes through (finished runs only, latest row per input)."""
