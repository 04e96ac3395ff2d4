"""Hypothesis profiles: a fast default for local runs and a deeper ``ci`` profile (HYPOTHESIS_PROFILE=ci).

Both disable the per-example deadline: the first call of a numba kernel compiles (or loads its cache).
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=40, deadline=None)
settings.register_profile("ci", max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
