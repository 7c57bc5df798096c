"""The synthetic-data generators: seeded CTs with exact femur labels, one module per family (``cases`` is the one
entry, ``generate_case``). They feed training, the benchmarks and the tests; nothing here runs at inference."""
