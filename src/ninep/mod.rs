//! 9P2000.L: the wire codec (no I/O), the server (fid table, dispatch), and the backends.
