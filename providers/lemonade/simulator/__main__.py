"""`python -m providers.lemonade.simulator`: run the lemond simulator."""

import sys

from providers.lemonade.simulator.server import main

sys.exit(main())
