import sys

from providers.lemonade.conformance.runner import main

sys.exit(main())
