"""Preprocess the amos22 release layout.

Same options and code path as `anatomask-lab prepare amos22`:

    python data_scripts/prepare_amos22.py --src DIR --out DIR [options]   (--help lists them)
"""

import sys

from anatomask_lab.data.prepare import script_main

if __name__ == "__main__":
    sys.exit(script_main("amos22"))
