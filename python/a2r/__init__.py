"""a2r: the A2R parallel-reasoning loop (explorer -> thinker -> synthesizer) over a2r_kernels."""

__version__ = "0.1.0"
