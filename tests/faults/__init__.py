"""Fault injection: each module reproduces a way a user or an operator lost data, got a hang or a
traceback (reliability round 3), and asserts what happens now. docs/reliability.md lists the cases."""
