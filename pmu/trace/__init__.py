"""The tracer: the ptrace engine for tasks, stops, breakpoints, out-of-line slots, patching and mappings.

It knows nothing of events: the layer above hears lifecycle changes through a TraceListener.
"""
