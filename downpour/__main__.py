import sys

from downpour.cli.main import main

sys.exit(main())
