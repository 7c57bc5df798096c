"""From a corrected femur label to a finite-element model (issue 26, DESIGN.md §10).

One concern per module, imported downwards only (fe uses FemurSegLib.surface, imageio and errors; nothing below
imports fe): ``calibration`` (HU -> equivalent mineral density), ``materials`` (density -> Young's modulus laws,
material bins), ``mesh`` (label -> tetrahedra with pytetwild), ``mapping`` (moduli integrated over each element at
Gauss points), ``loadcases`` (named node sets), ``solve`` (a linear-elastic check with scikit-fem), ``model`` (what
the writers take), ``write_inp`` / ``write_feb`` / ``write_cdb`` / ``write_vtu`` (one solver format each) and
``pipeline`` (all of it, as ``femurseg fe`` runs it). Units everywhere: mm, N, MPa; densities in mg/cm^3.
"""
