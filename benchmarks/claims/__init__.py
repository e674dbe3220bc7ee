"""The claims: each paper's claim tested (study.py), and what no paper tested (beyond.py)."""
