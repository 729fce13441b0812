"""``python -m vod_client upload FILE --title ...``"""

import sys

from vod_client.cli import main

sys.exit(main())
