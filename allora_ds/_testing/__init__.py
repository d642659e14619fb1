"""Hooks for the test suite only; nothing here runs unless a test asks for it."""
