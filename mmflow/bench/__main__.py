"""`python -m mmflow.bench`: the engine benchmark (`mmflow.bench.engine`), or with `--driver` the sweep
driver's (`mmflow.bench.driver`, which imports no torch)."""

import sys

if "--driver" in sys.argv:
    from mmflow.bench.driver import main as driver_main

    driver_main([a for a in sys.argv[1:] if a != "--driver"])
else:
    from mmflow.bench.engine import main

    main()
