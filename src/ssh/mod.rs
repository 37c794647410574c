//! Our layer over russh: keys, authorized keys, known_hosts, ssh_config, client and server.

pub mod authorized_keys;
pub mod hostkey;
pub mod pty;
pub mod server;
pub mod session;
