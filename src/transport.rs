//! Streams and listeners for every transport: tcp, vsock, unix and unix-vsock.
