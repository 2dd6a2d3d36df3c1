import sys

from llmemb.cli import main

sys.exit(main())
