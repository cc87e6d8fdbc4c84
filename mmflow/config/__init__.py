"""Cell configs before anything loads: where `conf/` and `sweeps/` are (`dirs`), path expansion,
unknown keys refused (`known_keys`), and the checks that refuse a cell that cannot compute anything
(`checks`, `validate`); the typed cell (`spec`, `parts`) and what makes its id (`identity`)."""
