import sys

from prism_mcore.bench import main

raise SystemExit(main(sys.argv[1:]))
