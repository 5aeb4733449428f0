"""lemond conformance: run lemond's own test suites against the hal0 lemond simulator.

`make conformance LEMONADE_SRC=<lemonade checkout or git dir>`; see docs/conformance.md.
"""
