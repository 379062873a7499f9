import sys

from marlwatch.cli import main

sys.exit(main(sys.argv[1:]))
