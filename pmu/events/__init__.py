"""Events: what a user asks for (EventAttr, ProbeSpec), where it lands (symbols) and its live state (Event)."""
