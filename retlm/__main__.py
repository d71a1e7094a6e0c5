import sys

from retlm.cli.main import main

sys.exit(main())
