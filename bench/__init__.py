"""`make bench` (run.py) and its parts."""
