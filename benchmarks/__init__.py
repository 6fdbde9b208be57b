"""``make bench``: the stack measured side by side with raw engines and peer servers.

Run ``python -m benchmarks --help`` for the comparisons; ``benchmarks/README.md`` explains them.
"""
