import sys

try:
    from marlwatch.cli import main
except KeyboardInterrupt:  # Ctrl-C before main() could catch it: same line and code as in main()
    print("marlwatch: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main(sys.argv[1:]))
