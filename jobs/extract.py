#!/usr/bin/env python
"""Entry script: `python jobs/extract.py --input DIR --output DIR` (see --help), locally or under
`ray job submit --working-dir . -- python jobs/extract.py ...`."""

import os
import sys

# Under `ray job submit --working-dir .` the package travels in the working dir, not site-packages.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_features.cli import main  # noqa: E402
from resnet_features.core.entry import exit_process  # noqa: E402

if __name__ == "__main__":
    # main() has shut down Ray and committed the output: skip Python's slow teardown.
    exit_process(main())
