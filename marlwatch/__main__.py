import os
import sys

try:
    from marlwatch.cli.main import entry
except KeyboardInterrupt:  # Ctrl-C before main() could catch it: same line and code as in main()
    print("marlwatch: interrupted", file=sys.stderr, flush=True)
    os._exit(130)  # not sys.exit: see marlwatch.cli.main.entry

entry()
