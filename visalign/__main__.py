import sys

from visalign.cli import main

sys.exit(main())
