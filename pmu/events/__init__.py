"""Events: what a user asks for (EventAttr, ProbeSpec), where it lands (symbols), its live state (Event)."""
