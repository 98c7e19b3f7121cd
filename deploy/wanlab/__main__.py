import sys

from wanlab.cli import main

sys.exit(main())
