"""mmgpt_engine's benchmark suite: every kernel and the training step against the implementations
a user would otherwise pick, on the same card in the same run, as fractions of the card's
measured limits. See benchmarks/README.md.

    python -m benchmarks [--quick] [--dry-run] [--out DIR] [--only attention,norms,...]
"""
