"""Preprocess a folder of unlabelled images (searched recursively) for pretraining.

Same options and code path as `anatomask-lab prepare folder`:

    python data_scripts/prepare_folder.py --src DIR --out DIR [options]   (--help lists them)
"""

import sys

from anatomask_lab.data.prepare import script_main

if __name__ == "__main__":
    sys.exit(script_main("folder"))
