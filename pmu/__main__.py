"""`python -m pmu`: the same entry point as the `pmu` console script, the stop signals taken over first."""

try:
    from pmu import stopping

    stopping.take_over()  # before pmu.commands and what it imports: see pmu.stopping
except KeyboardInterrupt:  # Python's own SIGINT handler, a moment before ours was in
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)

from pmu.commands import main  # noqa: E402

raise SystemExit(main())
