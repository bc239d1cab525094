"""``python -m onnxlady`` runs the command line."""

import sys

from onnxlady.cli import main

sys.exit(main())
