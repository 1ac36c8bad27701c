"""Attacks from the hostile review, one readable test each, against the real server
where the finding was seen there. Each test's docstring names its finding number."""
