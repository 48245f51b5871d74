"""Hypothesis profiles for the property-based tests (router parsing, store, spec parser).

`ci` (the default) keeps each property to a few seconds and is derandomized: every CI run tries
the same examples, so a red run is a regression, never a lucky draw. `long` searches at random
with many more examples: run `pytest --hypothesis-profile=long tests` by hand to find new bugs,
then pin what it finds as a regression test. Examples are not stored between runs
(`database=None`): a clean clone and a developer checkout behave the same.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=150, deadline=None, database=None, print_blob=True, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long", max_examples=5000, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")
