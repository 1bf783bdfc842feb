import sys

from imnode.cli import main

sys.exit(main())
