"""The synthetic-data generators: seeded CTs with exact femur labels, one module per family (``cases`` is the one
entry, ``generate_case``). They feed training, the benchmarks and the tests; nothing here runs at inference."""

# The clinical family's kinds of field of view (clinical.py; here so that the CLI can list them without importing
# the generators). "spine" and "legs" hold no femur.
CLINICAL_VIEWS = ("hip", "abdomen", "runoff", "one_hip", "spine", "legs")
