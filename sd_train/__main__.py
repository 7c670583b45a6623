import sys

from sd_train.cli import main

sys.exit(main())
