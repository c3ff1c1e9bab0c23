#!/usr/bin/env python
"""Entry script: k-NN search over an extraction output (see --help)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_features.tools.search import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
