"""Preprocess the totalsegmentator release layout.

Same options and code path as `anatomask-lab prepare totalsegmentator`:

    python data_scripts/prepare_totalsegmentator.py --src DIR --out DIR [options]   (--help lists them)
"""

import sys

from anatomask_lab.data.prepare import script_main

if __name__ == "__main__":
    sys.exit(script_main("totalsegmentator"))
