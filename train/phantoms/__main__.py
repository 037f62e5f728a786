"""``python -m train.phantoms OUT --lesion tumour --seed 3 --count N``"""

import sys

from train.phantoms.cli import main

sys.exit(main())
