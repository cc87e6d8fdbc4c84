"""Running a cell batch on one loaded model: samples prepared ahead (`pipeline`, `prepare`), one clean
pass per sample, every cell's engine jobs together (`runtime`), the clean answer (`answer`), and each
cell's lifecycle from start to ending (`cell`, `context`)."""
