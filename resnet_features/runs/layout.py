"""Names of an output's folders and files (placeholder; merged with the catalog branch)."""

EXPLAIN_PNG_DIR = "_explain_png"  # "_": dataset readers skip it
