import sys

from twintune.cli import main

sys.exit(main())
