"""`python -m pmu`: the same entry point as the `pmu` console script."""

from pmu.commands import main

raise SystemExit(main())
