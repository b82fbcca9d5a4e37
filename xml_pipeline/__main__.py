"""``python -m xml_pipeline`` is the ``xml-pipeline`` command."""

import sys

from xml_pipeline.cli import main

sys.exit(main())
