"""Shared test helpers."""

# Seconds a test waits for a process it started (a training run, a launcher, a collective between
# its ranks) before it calls it hung. Only a net against a hang, never a measure of speed: on a
# 2-core machine at load 6 a run takes several times as long as on a quiet one, and a rank may
# reach a collective minutes after its peer.
PATIENCE_S = 1200
