"""Preprocess an nnU-Net v2 raw data set (DatasetXXX_Name with dataset.json, imagesTr, labelsTr, imagesTs).

Same options and code path as `anatomask-lab prepare nnunet`:

    python data_scripts/prepare_nnunet.py --src DIR --out DIR [options]   (--help lists them)
"""

import sys

from anatomask_lab.data.prepare import script_main

if __name__ == "__main__":
    sys.exit(script_main("nnunet"))
