import sys

from tierwise_cli.main import main

sys.exit(main())
