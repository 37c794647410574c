//! Our layer over russh: keys, authorized keys, known_hosts, ssh_config, client and server.

pub mod client;
pub mod config;
pub mod keys;
pub mod known_hosts;
