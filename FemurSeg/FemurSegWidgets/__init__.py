"""Parts of the FemurSeg panel kept out of FemurSeg.py, which stays thin glue (Qt widgets only; the work is done by
FemurSegLib)."""
