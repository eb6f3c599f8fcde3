"""Scheduler unit tests: EventContext and Scheduler against the recording FakePmu."""
