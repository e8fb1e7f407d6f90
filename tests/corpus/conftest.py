"""The corpus is data for tests/test_corpus.py, not tests: no collector may import its files
(the buggy cases fail on purpose, and broken/ holds a file that does not even parse)."""
collect_ignore_glob = ["*.py", "broken/*.py"]
