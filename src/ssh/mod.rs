//! Our layer over russh: keys, authorized keys, known_hosts, ssh_config, client and server.

pub mod admission;
pub mod authorized_keys;
pub mod backlog;
pub mod client;
pub mod coalesce;
pub mod config;
pub mod hostkey;
pub mod kexcheck;
pub mod keys;
pub mod known_hosts;
pub mod pty;
pub mod server;
pub mod session;
pub mod spawn;
