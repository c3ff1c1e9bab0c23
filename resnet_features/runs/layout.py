"""Names of an output's layout (folders, files, the ledger schema): owned by runs/, used by the
writer that fills a run's staging folder and by every reader of an output.

    OUTPUT/run=<id>/part-*.parquet, _errors/, _ledger/, _explain_png/, _manifest.json,
                    _summary.json, _SUCCESS
    OUTPUT/_staging/run=<id>/ (with _tmp/ and _attempts/), OUTPUT/_trash/
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["ATTEMPTS_DIR", "ERRORS_DIR", "EXPLAIN_PNG_DIR", "LEDGER_DIR", "LEDGER_SCHEMA",
           "MANIFEST_FILE", "RUN_PREFIX", "STAGING_DIR", "STAGING_ROOT", "SUCCESS_FILE",
           "SUMMARY_FILE", "TMP_DIR", "TRASH_ROOT"]

RUN_PREFIX = "run="  # OUTPUT/run=<id>/: hive-style, so datasets see a `run` column
STAGING_ROOT = STAGING_DIR = "_staging"
TRASH_ROOT = "_trash"
ATTEMPTS_DIR = "_attempts"
MANIFEST_FILE = "_manifest.json"
SUMMARY_FILE = "_summary.json"
SUCCESS_FILE = "_SUCCESS"
ERRORS_DIR = "_errors"
EXPLAIN_PNG_DIR = "_explain_png"  # "_": dataset readers skip it
LEDGER_DIR = "_ledger"
TMP_DIR = "_tmp"

LEDGER_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("fingerprint", pa.string()),
        ("status", pa.string()),  # "ok" (a data row) or "error" (an error row)
        ("file", pa.string()),  # the data or error file holding the row, relative to the run
    ]
)
