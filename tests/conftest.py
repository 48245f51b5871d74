"""Hypothesis profiles for the property-based tests (router parsing, store, spec parser).

`ci` (the default) keeps each property to a few seconds so `make test` stays bounded; run
`pytest --hypothesis-profile=long tests` by hand for a deeper search. Examples are not stored
between runs (`database=None`): a clean clone and a developer checkout search the same way.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=150, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long", max_examples=5000, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")
