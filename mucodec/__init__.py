"""MuCodec: a dependency-light reimplementation of the 0.35 kbps music codec."""
