import sys

from clocmllm.cli import main

sys.exit(main())
