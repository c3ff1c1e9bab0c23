#!/usr/bin/env python
"""Entry script: train a linear/MLP head on an extraction output's embeddings (see --help)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_features.tools.probe import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
