"""Real servers for the test suite (never mocks)."""
